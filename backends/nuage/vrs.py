"""The connection to the local VRS: its OVSDB, through the python-ovs IDL.
Owns the OVSDB connection, its transactions and reconnects; nothing else speaks OVSDB.

One ``VrsClient`` per worker process keeps one long-lived IDL connection to
the VRS's ``ovsdb-server`` (``Open_vSwitch`` database: the stock Bridge/Port/
Interface tables plus ``Nuage_VM_Table`` and ``Nuage_Port_Table``).  A
background thread is the only one that runs ``Idl.run()``; request threads
build and send transactions under the same lock and then wait, on a condition
the background thread signals after every ``run()``, for the reply or for VRS
to resolve a vPort.  Every wait has a deadline.

The IDL reconnects by itself (with a short backoff) when ovsdb-server restarts
or the connection drops; each time the replica is fully loaded again the
``on_connect`` callback runs (in its own thread), which lets the backend
re-assert the rows of its live endpoints.

Nothing here shells out: no ``ovs-vsctl``.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import ovs.db.idl
import ovs.jsonrpc
import ovs.poller
import ovs.stream

from netplugin.errors import PluginError

from backends.nuage.vport import (EXT_DRIVER, EXT_ENDPOINT, UNRESOLVED_IPS, Resolution,
                                  VPort)

log = logging.getLogger(__name__)

DB_NAME = "Open_vSwitch"
PORT_TABLE = "Nuage_Port_Table"
VM_TABLE = "Nuage_VM_Table"

#: Tables and columns the backend reads or writes.
COLUMNS: Dict[str, List[str]] = {
    "Bridge": ["name", "ports"],
    "Port": ["name", "interfaces", "external_ids"],
    "Interface": ["name", "external_ids"],
    VM_TABLE: ["vm_uuid", "vm_name", "type", "domain", "event", "event_type", "state",
               "reason", "nuage_user", "nuage_enterprise", "metadata", "ports", "dirty"],
    PORT_TABLE: ["name", "mac", "bridge", "alias", "vm_domain", "nuage_domain",
                 "nuage_zone", "nuage_network", "nuage_network_type", "ip_addr",
                 "subnet_mask", "gateway", "evpn_id", "vrf_id", "metadata", "dirty"],
}
#: Columns a real VRS may lack (older schemas): written only when present.
OPTIONAL_COLUMNS = {VM_TABLE: {"dirty"}, PORT_TABLE: {"alias", "dirty", "evpn_id", "vrf_id"}}

RECONNECT_MIN_BACKOFF_MS = 250
RECONNECT_MAX_BACKOFF_MS = 2000
SCHEMA_RETRY_S = 1.0


class VrsError(PluginError):
    """VRS refused or failed an operation."""


class VrsUnavailable(VrsError):
    """VRS's OVSDB cannot be reached (or is not a Nuage VRS)."""


class ResolveTimeout(VrsError):
    """VRS did not resolve a vPort in time."""


def vrs_remote(endpoint: str, port: int) -> str:
    """``[nuage] vrs_endpoint``/``vrs_port`` -> an OVSDB remote.

    ``unix:/path`` (or an absolute path) is a unix socket; anything else is a
    host name or address reached over TCP on ``port`` (the seed's form)."""
    endpoint = endpoint.strip()
    if endpoint.startswith("unix:"):
        return endpoint
    if endpoint.startswith("/"):
        return "unix:" + endpoint
    host = endpoint.strip("[]")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise VrsUnavailable(f"cannot resolve VRS host {host!r}: {exc}") from None
        infos.sort(key=lambda i: i[0] != socket.AF_INET)  # IPv4 first
        addr = ipaddress.ip_address(infos[0][4][0])
    return f"tcp:[{addr}]:{port}" if addr.version == 6 else f"tcp:{addr}:{port}"


def _errstr(error) -> str:
    if isinstance(error, int):
        return os.strerror(error) if error > 0 else f"error {error}"
    return str(error)


class RpcError(VrsError):
    """The OVSDB server answered a JSON-RPC request with an error."""


def rpc_call(remote: str, method: str, params: list, timeout: float) -> Any:
    """One JSON-RPC request over a throw-away connection, bounded by ``timeout``;
    raise ``VrsUnavailable`` (unreachable, silent) or ``RpcError``."""
    deadline = time.monotonic() + timeout
    error, stream = ovs.stream.Stream.open_block(ovs.stream.Stream.open(remote),
                                                 max(1, int(timeout * 1000)))
    if error:
        raise VrsUnavailable(f"cannot connect to VRS OVSDB at {remote}: {_errstr(error)}")
    conn = ovs.jsonrpc.Connection(stream)
    try:
        req = ovs.jsonrpc.Message.create_request(method, params)
        error = conn.send(req)
        while True:
            if error and error != errno.EAGAIN:
                raise VrsUnavailable(f"VRS OVSDB at {remote}: connection failed: "
                                     f"{_errstr(error)}")
            error, msg = conn.recv()
            if msg is not None:
                if msg.id != req.id:
                    error = 0
                    continue
                if msg.type == ovs.jsonrpc.Message.T_ERROR:
                    raise RpcError(f"OVSDB at {remote}: {method} failed: {msg.error}")
                return msg.result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VrsUnavailable(f"VRS OVSDB at {remote} did not answer in {timeout:g}s")
            conn.run()
            poller = ovs.poller.Poller()
            conn.wait(poller)
            conn.recv_wait(poller)
            poller.timer_wait(int(remaining * 1000) + 1)
            poller.block()
    finally:
        conn.close()


def fetch_schema(remote: str, timeout: float) -> Dict[str, Any]:
    """``get_schema Open_vSwitch`` over a throw-away connection, bounded."""
    try:
        return rpc_call(remote, "get_schema", [DB_NAME], timeout)
    except RpcError as exc:
        raise VrsUnavailable(f"OVSDB at {remote} has no {DB_NAME} database "
                             f"({exc}): is it a VRS?") from None


def schema_helper(schema_json: Dict[str, Any], remote: str):
    """A SchemaHelper registering COLUMNS; clear error if VRS lacks a table."""
    tables = schema_json.get("tables") or {}
    missing = [t for t in (VM_TABLE, PORT_TABLE) if t not in tables]
    if missing:
        raise VrsUnavailable(f"OVSDB at {remote} has no {', '.join(missing)} table: it is "
                             "a plain Open vSwitch, not a Nuage VRS")
    helper = ovs.db.idl.SchemaHelper(schema_json=schema_json)
    for table, columns in COLUMNS.items():
        have = tables.get(table, {}).get("columns", {})
        optional = OPTIONAL_COLUMNS.get(table, set())
        lacking = [c for c in columns if c not in have and c not in optional]
        if lacking:
            raise VrsUnavailable(f"OVSDB at {remote}: table {table} lacks column(s) "
                                 f"{', '.join(lacking)}")
        helper.register_columns(table, [c for c in columns if c in have])
    return helper


class VrsClient:
    """Thread-safe access to VRS's OVSDB (see the module docstring)."""

    def __init__(self, remote: str, bridge: str, timeout: float = 5.0,
                 on_connect: Optional[Callable[[int], None]] = None):
        self.remote = remote
        self.bridge = bridge
        self.timeout = timeout
        self.on_connect = on_connect
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._idl: Optional[ovs.db.idl.Idl] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._last_error = "not connected yet"
        self._loaded_seqno: Optional[int] = None   # session seqno fully loaded
        self.connections = 0                       # completed (re)connections

    # ---- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nuage-vrs", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        with self._lock:
            if self._idl is not None:
                self._idl.close()
                self._idl = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    # ---- background thread ----------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._idl is None:
                try:
                    helper = schema_helper(fetch_schema(self.remote, self.timeout), self.remote)
                except VrsUnavailable as exc:
                    with self._cond:
                        if str(exc) != self._last_error:
                            log.warning("%s (retrying every %gs)", exc, SCHEMA_RETRY_S)
                        self._last_error = str(exc)
                        self._cond.notify_all()
                    self._stop.wait(SCHEMA_RETRY_S)
                    continue
                except Exception as exc:  # noqa: BLE001 - keep the thread alive
                    log.exception("VRS schema fetch crashed")
                    with self._cond:
                        self._last_error = f"{type(exc).__name__}: {exc}"
                    self._stop.wait(SCHEMA_RETRY_S)
                    continue
                with self._cond:
                    idl = ovs.db.idl.Idl(self.remote, helper)
                    idl._session.reconnect.set_backoff(RECONNECT_MIN_BACKOFF_MS,
                                                       RECONNECT_MAX_BACKOFF_MS)
                    self._idl = idl
                    self._last_error = "connecting"
                log.info("VRS: connecting to %s (bridge %s)", self.remote, self.bridge)
            fire = None
            try:
                with self._cond:
                    idl = self._idl
                    if idl is None:
                        continue
                    idl.run()
                    session = idl._session
                    if session.is_connected() and idl.state == idl.IDL_S_MONITORING:
                        seqno = session.get_seqno()
                        if seqno != self._loaded_seqno:
                            self._loaded_seqno = seqno
                            self.connections += 1
                            fire = self.connections
                            log.info("VRS: connected to %s (connection #%d)",
                                     self.remote, self.connections)
                    elif self._loaded_seqno is not None and not session.is_connected():
                        log.warning("VRS: connection to %s lost; reconnecting", self.remote)
                        self._loaded_seqno = None
                        self._last_error = "connection lost, reconnecting"
                    self._cond.notify_all()
                    poller = ovs.poller.Poller()
                    idl.wait(poller)
                    poller.fd_wait(self._wake_r, ovs.poller.POLLIN)
                    poller.timer_wait(1000)
                if fire is not None and self.on_connect is not None:
                    threading.Thread(target=self._fire, args=(fire,), daemon=True,
                                     name=f"nuage-vrs-connect-{fire}").start()
                poller.block()
                self._drain_wake()
            except Exception:  # noqa: BLE001 - never let the thread die
                log.exception("VRS: IDL loop error")
                self._stop.wait(0.5)

    def _fire(self, n: int) -> None:
        try:
            self.on_connect(n)
        except Exception:  # noqa: BLE001
            log.exception("VRS: on_connect handler failed")

    # ---- readiness ------------------------------------------------------------
    def _ready_locked(self) -> bool:
        idl = self._idl
        return (idl is not None and idl._session.is_connected()
                and idl.state == idl.IDL_S_MONITORING
                and self._loaded_seqno == idl._session.get_seqno())

    @property
    def last_error(self) -> str:
        """Why the client is not connected (or the last connection error)."""
        return self._last_error

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._ready_locked()

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Block until the replica is loaded; VrsUnavailable after ``timeout``."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._ready_locked():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise VrsUnavailable(f"VRS OVSDB at {self.remote} is not reachable "
                                         f"({self._last_error}) after {timeout:g}s")
                self._cond.wait(min(remaining, 0.5))

    # ---- transactions -----------------------------------------------------------
    def transact(self, what: str, build: Callable[[ovs.db.idl.Transaction, dict], None],
                 timeout: Optional[float] = None) -> str:
        """Run ``build(txn, idl.tables)`` under the lock and commit it; retry on
        TRY_AGAIN (and on an index clash, re-reading the rows) until
        ``timeout``.  Returns the final status (SUCCESS or UNCHANGED)."""
        Txn = ovs.db.idl.Transaction
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        attempt = 0
        last = ""
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VrsUnavailable(f"{what}: no answer from VRS OVSDB at {self.remote} "
                                     f"within {timeout:g}s ({last or self._last_error})")
            self.wait_ready(remaining)
            with self._cond:
                idl = self._idl
                seqno = idl.change_seqno
                txn = Txn(idl)
                try:
                    build(txn, idl.tables)
                except BaseException:
                    txn.abort()
                    raise
                status = txn.commit()
            self._wake()
            with self._cond:
                while status == Txn.INCOMPLETE:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise VrsUnavailable(
                            f"{what}: VRS OVSDB at {self.remote} did not confirm the "
                            f"transaction within {timeout:g}s")
                    self._cond.wait(min(remaining, 0.5))
                    status = txn.commit()   # not the active txn: just the status
                if status in (Txn.SUCCESS, Txn.UNCHANGED):
                    return status
                error = txn.get_error()
                if status == Txn.TRY_AGAIN or (status == Txn.ERROR and attempt < 3
                                               and "constraint violation" in error):
                    last = f"{status}: {error}"
                    log.info("%s: %s, retrying", what, last)
                    # wait for the replica to change (or a short while) before retrying
                    self._cond.wait_for(lambda: self._idl is not idl or
                                        idl.change_seqno != seqno,
                                        timeout=max(0.0, min(0.5, deadline - time.monotonic())))
                    continue
                raise VrsError(f"{what}: VRS OVSDB transaction failed: {status}: {error}")

    # ---- queries (call with or without the lock: they take it) -------------------
    def _rows(self, table: str):
        return self._idl.tables[table].rows.values() if self._idl is not None else []

    def snapshot_ports(self) -> Dict[str, Dict[str, str]]:
        """``{port name: {"endpoint": eid, "driver": name, "bridge": name}}`` of
        every OVS Port (``""`` where the port carries no netplugin marker)."""
        with self._lock:
            bridges = {}
            for br in self._rows("Bridge"):
                for p in br.ports:
                    bridges[p.uuid] = br.name
            return {p.name: {"endpoint": p.external_ids.get(EXT_ENDPOINT, ""),
                             "driver": p.external_ids.get(EXT_DRIVER, ""),
                             "bridge": bridges.get(p.uuid, "")}
                    for p in self._rows("Port")}

    def bridge_exists(self) -> bool:
        with self._lock:
            return any(b.name == self.bridge for b in self._rows("Bridge"))

    def resolution(self, name: str) -> Optional[Resolution]:
        with self._lock:
            return self._resolution_locked(name)

    def _resolution_locked(self, name: str) -> Optional[Resolution]:
        for r in self._rows(PORT_TABLE):
            if r.name == name:
                return Resolution.from_row(r.ip_addr, r.subnet_mask, r.gateway,
                                           getattr(r, "vrf_id", 0), getattr(r, "evpn_id", 0))
        return None

    def wait_resolved(self, name: str, timeout: float) -> Resolution:
        """Wait until VRS filled ip_addr/subnet_mask/gateway of vPort ``name``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._idl is not None:
                    found = False
                    for r in self._rows(PORT_TABLE):
                        if r.name == name:
                            found = True
                            res = Resolution.from_row(r.ip_addr, r.subnet_mask, r.gateway,
                                                      getattr(r, "vrf_id", 0),
                                                      getattr(r, "evpn_id", 0))
                            if res is not None:
                                return res
                    if not found and self._ready_locked():
                        raise VrsError(f"vPort {name} vanished from {PORT_TABLE} while "
                                       "waiting for VRS to resolve it")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    ip = ""
                    for r in self._rows(PORT_TABLE):
                        if r.name == name:
                            ip = r.ip_addr
                    raise ResolveTimeout(
                        f"VRS did not resolve vPort {name} within {timeout:g}s (ip_addr "
                        f"{ip or 'still empty'}): check that VRS is connected to its "
                        "controller and that the enterprise/domain/zone/subnet/user of the "
                        "network exist on VSD")
                self._cond.wait(min(remaining, 0.5))

    # ---- the vPort rows -------------------------------------------------------
    def ensure_vport(self, vp: VPort, fresh: bool, timeout: Optional[float] = None) -> None:
        """Write (or re-assert) the OVS Port/Interface on the bridge and both Nuage
        rows for ``vp``, in one transaction.  ``fresh`` replaces a leftover
        Nuage_Port_Table row (clearing stale resolved values) instead of updating
        it in place."""

        def build(txn, t):
            bridge = next((b for b in t["Bridge"].rows.values() if b.name == self.bridge), None)
            if bridge is None:
                raise VrsError(f"bridge {self.bridge} does not exist in VRS OVSDB at "
                               f"{self.remote}: set vrs_bridge to the VRS bridge")
            ext = vp.external_ids()
            # OVS Port + Interface on the bridge
            port = next((p for p in t["Port"].rows.values() if p.name == vp.name), None)
            if port is not None and port not in bridge.ports:
                owner = next((b for b in t["Bridge"].rows.values() if port in b.ports), None)
                if owner is not None:
                    raise VrsError(f"OVS port {vp.name} already exists on bridge {owner.name}")
                port = None
            if port is None:
                itf = next((i for i in t["Interface"].rows.values() if i.name == vp.name),
                           None) or txn.insert(t["Interface"])
                itf.name = vp.name
                itf.external_ids = ext
                port = txn.insert(t["Port"])
                port.name = vp.name
                port.interfaces = [itf]
                port.external_ids = ext
                bridge.addvalue("ports", port)
            else:
                if dict(port.external_ids) != ext:
                    port.external_ids = ext
                for itf in port.interfaces:
                    if itf.name == vp.name and dict(itf.external_ids) != ext:
                        itf.external_ids = ext
            # Nuage_Port_Table
            cols = vp.port_columns()
            rows = [r for r in t[PORT_TABLE].rows.values() if r.name == vp.name]
            if fresh or len(rows) > 1:
                for r in rows:
                    r.delete()
                rows = []
            if rows:
                row = rows[0]
                for k, v in cols.items():
                    if _differs(getattr(row, k), v):
                        setattr(row, k, v)
            else:
                row = txn.insert(t[PORT_TABLE])
                for k, v in cols.items():
                    setattr(row, k, v)
            # Nuage_VM_Table: one row per container, listing its vPorts
            vcols = vp.vm_columns()
            vm = next((v for v in t[VM_TABLE].rows.values() if v.vm_uuid == vp.vm_uuid), None)
            if vm is None:
                vm = txn.insert(t[VM_TABLE])
                for k, v in vcols.items():
                    setattr(vm, k, v)
                vm.ports = [vp.name]
            else:
                for k, v in vcols.items():
                    if _differs(getattr(vm, k), v):
                        setattr(vm, k, v)
                if vp.name not in vm.ports:
                    vm.addvalue("ports", vp.name)
            # a stale VM row of another entity must not list this vPort
            for other in t[VM_TABLE].rows.values():
                if other.vm_uuid != vp.vm_uuid and vp.name in other.ports:
                    _drop_port_from_vm(other, vp.name)

        self.transact(f"write vPort {vp.name}", build, timeout)

    def remove_vport(self, name: str, timeout: Optional[float] = None) -> bool:
        """Delete the Nuage rows and the OVS port of vPort ``name`` (idempotent:
        absent rows are fine).  Returns True if something was deleted."""
        changed = []

        def build(txn, t):
            changed.clear()
            for r in list(t[PORT_TABLE].rows.values()):
                if r.name == name:
                    r.delete()
                    changed.append(PORT_TABLE)
            for vm in list(t[VM_TABLE].rows.values()):
                if name in vm.ports:
                    _drop_port_from_vm(vm, name)
                    changed.append(VM_TABLE)
            for port in list(t["Port"].rows.values()):
                if port.name != name:
                    continue
                for br in t["Bridge"].rows.values():
                    if port in br.ports:
                        br.delvalue("ports", port)
                for itf in port.interfaces:
                    itf.delete()
                port.delete()
                changed.append("Port")

        self.transact(f"remove vPort {name}", build, timeout)
        return bool(changed)


def _drop_port_from_vm(vm, name: str) -> None:
    """Remove ``name`` from a VM row's ports; delete the row with its last port."""
    if [p for p in vm.ports if p != name]:
        vm.delvalue("ports", name)
    else:
        vm.delete()


def _differs(current: Any, wanted: Any) -> bool:
    if isinstance(wanted, dict):
        return dict(current or {}) != wanted
    return current != wanted


__all__ = ["VrsClient", "VrsError", "VrsUnavailable", "ResolveTimeout", "vrs_remote",
           "UNRESOLVED_IPS"]
