"""The consul datastore (consul's KV store through py-consul).
Owns the mapping of the interface onto consul's KV API (indexes, blocking queries).

Consul keys have no leading slash: ``/calico/v1/x`` is stored as
``calico/v1/x``.  ``version`` is consul's ``ModifyIndex``.

Writes go through consul's transaction endpoint (``/v1/txn``) rather than
``PUT /v1/kv``: a transaction answers with the ``ModifyIndex`` it gave the key,
so ``put``/``create``/``compare_and_swap`` return the true version of *their*
write (a ``kv.put`` followed by a ``kv.get`` could return someone else's), and
"delete if present" or "count and delete a tree" are single atomic steps.

Watches are blocking queries on the prefix; each answer is diffed against the
previous one.  Consul reports states, not changes, so changes that happen in
quick succession may reach a watch as one (e.g. two puts as the last one).
"""
from __future__ import annotations

import base64
import contextlib
import inspect
import json
import logging
import socket
from typing import Callable, Dict, List, Optional, Tuple

import consul
import requests

from netplugin.datastore.base import (
    CompareFailed, Datastore, DatastoreError, DatastoreUnavailable, Event, Item,
    KeyExists, KeyNotFound, Watch, WatchSet, deliver_events, diff_snapshot,
    bracketed, known_versions, normalize_prefix, parse_http_address)

_log = logging.getLogger(__name__)

DEFAULT_PORT = 8500
WATCH_WAIT = 1     # seconds a blocking query waits before asking again (bounds stop())
MAX_BACKOFF = 5.0  # seconds between two reconnection attempts of a watch, at most


def _parse_address(address: str) -> Tuple[str, str, int]:
    """``host:port`` (or ``http://host:port``) -> (scheme, host, port)."""
    scheme, host, port = parse_http_address(address, "consul address", DEFAULT_PORT,
                                            "host:port")
    return scheme, bracketed(host), port


def _ckey(key: str) -> str:
    """Our key -> consul's key (no leading slash)."""
    return key.lstrip("/")


def _okey(ckey: str) -> str:
    """Consul's key -> our key."""
    return "/" + ckey


def _b64(value: str) -> str:
    return base64.b64encode(value.encode("utf-8")).decode("ascii")


def _text(value) -> str:
    if value is None:
        return ""  # consul answers null for an empty value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _describe(exc: BaseException, timeout: float) -> str:
    """A short reason for a failed request: 'connection refused', ..."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError
    seen, queue, last = set(), [exc], exc
    while queue:
        e = queue.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        last = e
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, (requests.exceptions.Timeout, ReadTimeoutError, ConnectTimeoutError,
                          socket.timeout, TimeoutError)) \
                and not isinstance(e, NewConnectionError):
            return f"no answer within {timeout:g} s"
        if isinstance(e, socket.gaierror):
            return f"cannot resolve the host name ({e.strerror or e})"
        if isinstance(e, ConnectionResetError):
            return "connection reset"
        queue.extend(getattr(e, a, None) for a in ("reason", "__cause__", "__context__"))
        queue.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
    return str(last) or type(last).__name__


class ConsulDatastore(Datastore):
    name = "consul"

    def __init__(self, address: str = "127.0.0.1:8500", timeout: float = 5.0):
        self._scheme, self._host, self._port = _parse_address(address)
        self.address = (f"{self._host}:{self._port}" if self._scheme == "http"
                        else f"{self._scheme}://{self._host}:{self._port}")
        self.timeout = float(timeout)
        self._watchset = WatchSet()
        self._client = self._new_client()

    @classmethod
    def from_config(cls, cfg) -> "ConsulDatastore":
        return cls(cfg.address, cfg.timeout)

    def __repr__(self):
        return f"ConsulDatastore({self.address})"

    # -- plumbing ----------------------------------------------------------

    def _new_client(self) -> consul.Consul:
        host = self._host.strip("[]")
        kwargs = {}
        params = inspect.signature(consul.Consul.__init__).parameters
        if "connections_timeout" in params:
            kwargs["connections_timeout"] = self.timeout
        elif "timeout" in params:  # older py-consul
            kwargs["timeout"] = self.timeout
        with self._errors():
            return consul.Consul(host=host, port=self._port, scheme=self._scheme, **kwargs)

    @contextlib.contextmanager
    def _errors(self):
        """Turn every failure that is not one of ours into DatastoreUnavailable."""
        try:
            yield
        except DatastoreError:
            raise
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            raise DatastoreUnavailable(
                f"consul at {self.address} is unreachable: {_describe(e, self.timeout)}") from e
        except consul.ConsulException as e:
            raise DatastoreUnavailable(f"consul at {self.address} failed: {e}") from e
        except Exception as e:  # requests, garbage in the answer ...
            raise DatastoreUnavailable(
                f"consul at {self.address} failed: {_describe(e, self.timeout)}") from e

    def _txn(self, client: consul.Consul, ops: List[dict]) -> Tuple[bool, dict]:
        """Run a transaction: (committed, decoded answer).  Must be called
        inside ``_errors()``."""
        params = [("dc", client.dc)] if client.dc else None
        resp = client.http.put(lambda r: r, "/v1/txn", params=params,
                               data=json.dumps(ops), headers=client.prepare_headers())
        if resp.code not in (200, 409):
            raise DatastoreUnavailable(
                f"consul at {self.address} failed: HTTP {resp.code}: {str(resp.body)[:200]}")
        try:
            answer = json.loads(resp.body)
            if not isinstance(answer, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise DatastoreUnavailable(
                f"consul at {self.address} answered garbage: {e}: {str(resp.body)[:200]}") from None
        return resp.code == 200, answer

    @staticmethod
    def _failed_op(answer: dict) -> int:
        errors = answer.get("Errors") or []
        for err in errors:
            if isinstance(err, dict):
                return int(err.get("OpIndex", -1))
        return -1

    def _result_item(self, answer: dict, key: str, value: str) -> Item:
        for res in answer.get("Results") or []:
            kv = (res or {}).get("KV") or {}
            if kv.get("Key") == _ckey(key):
                return Item(key, value, int(kv["ModifyIndex"]))
        raise DatastoreUnavailable(
            f"consul at {self.address} answered garbage: no result for {key}")

    @staticmethod
    def _items(entries, prefix: str) -> List[Item]:
        """Items from a recursive kv.get answer, under the consul prefix ``prefix``."""
        items = [Item(_okey(e["Key"]), _text(e.get("Value")), int(e["ModifyIndex"]))
                 for e in entries or () if e["Key"].startswith(prefix) and e["Key"] != prefix]
        items.sort(key=lambda i: i.key)
        return items

    def _list(self, client: consul.Consul, prefix: str) -> Tuple[List[Item], int]:
        cp = _ckey(normalize_prefix(prefix if prefix.startswith("/") else "/" + prefix))
        with self._errors():
            index, entries = client.kv.get(cp, recurse=True)
            return self._items(entries, cp), int(index)

    @staticmethod
    def _check_value(value) -> str:
        if not isinstance(value, str):
            raise DatastoreError(f"datastore values must be strings, not {type(value).__name__}")
        return value

    @staticmethod
    def _key(key: str) -> str:
        return key if key.startswith("/") else "/" + key

    # -- the interface -----------------------------------------------------

    def get(self, key: str) -> Item:
        key = self._key(key)
        with self._errors():
            _, entry = self._client.kv.get(_ckey(key))
            if entry is None:
                raise KeyNotFound(key)
            return Item(key, _text(entry.get("Value")), int(entry["ModifyIndex"]))

    def put(self, key: str, value: str) -> Item:
        key, value = self._key(key), self._check_value(value)
        with self._errors():
            ok, answer = self._txn(self._client, [
                {"KV": {"Verb": "set", "Key": _ckey(key), "Value": _b64(value)}}])
            if not ok:
                raise DatastoreUnavailable(
                    f"consul at {self.address} refused to write {key}: {answer.get('Errors')}")
            return self._result_item(answer, key, value)

    def create(self, key: str, value: str) -> Item:
        key, value = self._key(key), self._check_value(value)
        with self._errors():
            ok, answer = self._txn(self._client, [
                {"KV": {"Verb": "cas", "Key": _ckey(key), "Value": _b64(value), "Index": 0}}])
            if not ok:
                raise KeyExists(key)
            return self._result_item(answer, key, value)

    def compare_and_swap(self, key: str, value: str, version: int) -> Item:
        key, value = self._key(key), self._check_value(value)
        if int(version) <= 0:  # index 0 would mean "create if absent"
            raise CompareFailed(key)
        with self._errors():
            ok, answer = self._txn(self._client, [
                {"KV": {"Verb": "cas", "Key": _ckey(key), "Value": _b64(value),
                        "Index": int(version)}}])
            if not ok:
                raise CompareFailed(key)
            return self._result_item(answer, key, value)

    def delete(self, key: str, version: Optional[int] = None) -> None:
        key = self._key(key)
        ck = _ckey(key)
        ops = [{"KV": {"Verb": "get", "Key": ck}}]  # fails the whole txn if absent
        if version is None:
            ops.append({"KV": {"Verb": "delete", "Key": ck}})
        else:
            ops.append({"KV": {"Verb": "delete-cas", "Key": ck, "Index": int(version)}})
        with self._errors():
            ok, answer = self._txn(self._client, ops)
            if ok:
                return
            if self._failed_op(answer) == 0:
                raise KeyNotFound(key)
            if version is not None:
                raise CompareFailed(key)
            raise DatastoreUnavailable(
                f"consul at {self.address} refused to delete {key}: {answer.get('Errors')}")

    def delete_prefix(self, prefix: str) -> int:
        cp = _ckey(normalize_prefix(self._key(prefix)))
        with self._errors():
            ok, answer = self._txn(self._client, [
                {"KV": {"Verb": "get-tree", "Key": cp}},
                {"KV": {"Verb": "delete-tree", "Key": cp}}])
            if not ok:
                raise DatastoreUnavailable(
                    f"consul at {self.address} refused to delete {prefix}: {answer.get('Errors')}")
            return sum(1 for res in answer.get("Results") or []
                       if ((res or {}).get("KV") or {}).get("Key", cp) != cp)

    def list_prefix(self, prefix: str) -> List[Item]:
        return self._list(self._client, self._key(prefix))[0]

    def watch_prefix(self, prefix: str, callback: Callable[[Event], None],
                     since: Optional[int] = None) -> Watch:
        prefix = self._key(prefix)
        cp = _ckey(normalize_prefix(prefix))
        client = self._new_client()  # own session: a watch holds its connection
        state: Dict = {"known": None, "index": None}

        def start() -> None:
            items, index = self._list(client, prefix)
            state["known"] = known_versions(items, since)
            state["index"] = index if since is None else int(since)

        return self._watchset.start(prefix, start, lambda watch: self._watch_loop(
            watch, client, cp, callback, state, start))

    def _watch_loop(self, watch: Watch, client: consul.Consul, cp: str, callback, state,
                    start) -> None:
        delay = 0.2
        try:
            while not watch.stopped:
                try:
                    if state["index"] is None:
                        start()
                    with self._errors():
                        index, entries = client.kv.get(cp, recurse=True, index=state["index"],
                                                       wait=f"{WATCH_WAIT}s")
                        index = int(index)
                        items = self._items(entries, cp)
                    events = diff_snapshot(state["known"], items, index)
                    # an index going backwards means consul was reset: start over
                    state["index"] = 0 if index < state["index"] else max(index, 1)
                    delay = 0.2
                    deliver_events(watch, callback, events)
                except DatastoreUnavailable as e:
                    if watch.stopped:
                        break
                    _log.warning("watch of /%s: %s; retrying in %.1f s", cp, e, delay)
                    watch.wait(delay)
                    delay = min(delay * 2, MAX_BACKOFF)
        finally:
            _close_client(client)

    def close(self) -> None:
        self._watchset.stop_all()
        _close_client(self._client)


def _close_client(client) -> None:
    session = getattr(getattr(client, "http", None), "session", None)
    if session is not None:
        try:
            session.close()
        except Exception:  # pragma: no cover - best effort
            pass
