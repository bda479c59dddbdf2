"""Tiny synchronous OVSDB client for test assertions (python-ovs JSON-RPC).

Tests read OVSDB through the unix socket file of the lab's ovsdb-server (a
file, so reachable from the test process) with one ``transact`` per call; the
plugin under test never uses this module.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from backends.nuage.vrs import VrsError, rpc_call

DB = "Open_vSwitch"


class OvsdbError(RuntimeError):
    pass


def _request(remote: str, method: str, params: list, timeout: float = 10.0) -> Any:
    try:
        return rpc_call(remote, method, params, timeout)
    except VrsError as exc:
        raise OvsdbError(str(exc)) from None


def transact(remote: str, *ops: Dict[str, Any], timeout: float = 10.0) -> List[Any]:
    result = _request(remote, "transact", [DB] + list(ops), timeout)
    for op in result:
        if isinstance(op, dict) and "error" in op:
            raise OvsdbError(f"{remote}: transact failed: {op}")
    return result


def _atom(value: Any) -> Any:
    """Decode OVSDB JSON: sets as lists, maps as dicts, uuids as strings."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        kind, inner = value
        if kind == "set":
            return [_atom(v) for v in inner]
        if kind == "map":
            return {_atom(k): _atom(v) for k, v in inner}
        if kind in ("uuid", "named-uuid"):
            return inner
    return value


def select(remote: str, table: str, where: Optional[list] = None,
           columns: Optional[List[str]] = None, timeout: float = 10.0) -> List[Dict[str, Any]]:
    """Rows of ``table`` as dicts (a one-element set comes back as a list too
    for the set columns we know: ports, interfaces)."""
    op: Dict[str, Any] = {"op": "select", "table": table, "where": where or []}
    if columns is not None:
        op["columns"] = columns
    rows = transact(remote, op, timeout=timeout)[0]["rows"]
    out = []
    for row in rows:
        decoded = {k: _atom(v) for k, v in row.items()}
        for k in ("ports", "interfaces"):
            if k in decoded and not isinstance(decoded[k], list):
                decoded[k] = [decoded[k]]
        out.append(decoded)
    return out


def list_tables(remote: str, timeout: float = 10.0) -> List[str]:
    schema = _request(remote, "get_schema", [DB], timeout)
    return sorted(schema["tables"])


def bridge_port_names(remote: str, bridge: str) -> List[str]:
    """Names of the Port rows in ``bridge``'s ports set."""
    br = select(remote, "Bridge", [["name", "==", bridge]], ["ports"])
    if not br:
        return []
    uuids = set(br[0]["ports"])
    return sorted(p["name"] for p in select(remote, "Port", columns=["_uuid", "name"])
                  if p["_uuid"] in uuids)
