"""The etcd datastore (etcd v2 API through python-etcd).
Owns the mapping onto etcd v2 (indexes, per-member retries, TLS/auth).

``version`` is etcd's ``modifiedIndex``.  Reads are quorum reads.  Several
endpoints: one python-etcd client per endpoint, without python-etcd's own
reconnection (it re-sends any failed request, a write whose answer was lost
included, to the next member).  Here a request that could not be *sent*
(connection refused, no connection) moves on to the next endpoint within
``timeout``; a read that got no answer too; a write that may have been
applied is re-read on another member and decided (see ``_conditional``),
never re-sent blindly.  TLS (``ca_file``, ``cert_file``/``key_file``) and
etcd v2 auth (``username``/``password``) as python-etcd supports them.

etcd v2 keeps directories: deleting the last key of a directory leaves the
(empty) directory behind; directories never show up as items.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import urllib.parse
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import etcd
import urllib3
from urllib3.exceptions import ConnectTimeoutError, ReadTimeoutError

from netplugin.datastore.base import (
    CompareFailed, Datastore, DatastoreError, DatastoreMisconfigured, DatastoreUnavailable,
    Event, Item, KeyExists, KeyNotFound, Members, NextMember, Watch, WatchSet, deliver_events,
    diff_snapshot, bracketed, endpoint_list, known_versions, normalize_prefix,
    parse_http_address)

_log = logging.getLogger(__name__)

DEFAULT_PORT = 2379
WATCH_POLL = 1.0      # seconds a watch request waits before asking again (bounds stop())
MAX_BACKOFF = 5.0     # seconds between two reconnection attempts of a watch, at most

PUT_ACTIONS = ("set", "create", "update", "compareAndSwap")
DELETE_ACTIONS = ("delete", "expire", "compareAndDelete")

# No retry of reads or of anything the server may already have applied (a
# retried compare-and-swap would answer "compare failed" for its own write);
# one retry of a refused connection.
_RETRIES = urllib3.Retry(total=None, connect=1, read=0, other=0, status=0, redirect=5,
                         raise_on_redirect=True, raise_on_status=False)


def _key(key: str) -> str:
    return key if key.startswith("/") else "/" + key


def _q(key: str) -> str:
    """Percent-encode a key for the URL path (python-etcd does not)."""
    return urllib.parse.quote(key, safe="/")


T = TypeVar("T")


class _Lost(Exception):
    """A write was sent but its answer lost: it may have been applied."""


def _causes(exc: BaseException):
    seen, queue = set(), [exc]
    while queue:
        e = queue.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        queue.extend(getattr(e, a, None) for a in ("cause", "reason", "__cause__", "__context__"))
        queue.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))


def _not_sent(exc: BaseException) -> bool:
    """The request never reached the server (safe to send elsewhere)."""
    return any(isinstance(e, (ConnectionRefusedError, socket.gaierror,
                              urllib3.exceptions.NewConnectionError, ConnectTimeoutError))
               for e in _causes(exc))


def _tls_failure(exc: BaseException) -> Optional[str]:
    for e in _causes(exc):
        if isinstance(e, (urllib3.exceptions.SSLError, ssl.SSLError)):
            text = str(e)
            for marker in ("certificate verify failed", "unknown ca", "bad certificate",
                           "certificate required", "wrong version number"):
                if marker in text.lower():
                    return f"TLS failed: {marker}"
            return f"TLS failed: {text[-200:]}"
    return None


def _describe(exc: BaseException, timeout: float) -> str:
    """A short reason for a failed request: 'connection refused', ..."""
    seen, queue, last = set(), [exc], exc
    while queue:
        e = queue.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        last = e
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, (ReadTimeoutError, ConnectTimeoutError, socket.timeout, TimeoutError)) \
                and not isinstance(e, urllib3.exceptions.NewConnectionError):
            return f"no answer within {timeout:g} s"
        if isinstance(e, socket.gaierror):
            return f"cannot resolve the host name ({e.strerror or e})"
        if isinstance(e, ConnectionResetError):
            return "connection reset"
        queue.extend(getattr(e, a, None) for a in ("cause", "reason", "__cause__", "__context__"))
        queue.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
    return str(last) or type(last).__name__


def _parse_endpoint(endpoint: str) -> Tuple[str, str, int]:
    """``http://host:port`` -> (protocol, host (an IPv6 literal in brackets), port)."""
    scheme, host, port = parse_http_address(endpoint, "etcd endpoint", DEFAULT_PORT,
                                            "http://host:port")
    return scheme, bracketed(host), port


class EtcdDatastore(Datastore):
    name = "etcd"

    def __init__(self, endpoints: Sequence[str] = ("http://127.0.0.1:2379",),
                 timeout: float = 5.0, ca_file: str = "", cert_file: str = "",
                 key_file: str = "", username: str = "", password: str = ""):
        self._endpoints = [_parse_endpoint(e) for e in endpoint_list(endpoints, "etcd")]
        self._uris = [f"{p}://{h}:{port}" for p, h, port in self._endpoints]
        self.address = ", ".join(self._uris)
        self.timeout = float(timeout)
        self._auth = {"username": username, "password": password} if username else {}
        self._tls: Dict[str, str] = {}
        for what, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
            if path:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as e:
                    raise DatastoreMisconfigured(f"etcd at {self.address}: cannot read {what} "
                                                 f"{path}: {e.strerror or e}") from None
        if ca_file:
            self._tls.update(cert_reqs="CERT_REQUIRED", ca_certs=ca_file)
        if cert_file:
            self._tls.update(cert_file=cert_file, key_file=key_file)
        self._lock = threading.Lock()
        self._clients: Optional[List[etcd.Client]] = None
        self._members = Members(self._uris, self.timeout)
        self._watchset = WatchSet()

    @classmethod
    def from_config(cls, cfg) -> "EtcdDatastore":
        return cls(cfg.endpoints, cfg.timeout, ca_file=cfg.ca_file, cert_file=cfg.cert_file,
                   key_file=cfg.key_file, username=cfg.username, password=cfg.password)

    def __repr__(self):
        return f"EtcdDatastore({self.address})"

    # -- plumbing ----------------------------------------------------------

    def _new_clients(self) -> List[etcd.Client]:
        """One client per endpoint, python-etcd's reconnection off.  With
        several endpoints a member gets half the timeout (one holding a
        request for a leader just killed must not eat the whole call)."""
        n = len(self._endpoints)
        per_member = self.timeout if n == 1 else max(0.5, self.timeout / 2)
        clients = []
        with self._errors():
            for protocol, host, port in self._endpoints:
                client = etcd.Client(host=host, port=port, protocol=protocol,
                                     read_timeout=per_member, allow_reconnect=False,
                                     **self._auth)
                client.http = urllib3.PoolManager(num_pools=10, maxsize=10, timeout=per_member,
                                                  retries=_RETRIES, **self._tls)
                clients.append(client)
        return clients

    def _get_clients(self) -> List[etcd.Client]:
        with self._lock:
            if self._clients is None:
                self._clients = self._new_clients()
            return self._clients

    def _call(self, op: Callable[[etcd.Client], T], idempotent: bool) -> T:
        """``op(client)`` on the current endpoint, moving on to the next one
        (within ``timeout``) when the request was not sent, or, for an
        ``idempotent`` one, got no answer.  A write that may have been
        applied raises ``_Lost``."""
        clients = self._get_clients()

        def attempt(i: int, left: float) -> T:
            try:
                return op(clients[i])
            except etcd.EtcdWatchTimedOut:
                raise
            except etcd.EtcdConnectionFailed as e:
                tls = _tls_failure(e)
                if tls:
                    raise DatastoreMisconfigured(f"etcd at {self._uris[i]}: {tls}") from None
                reason = _describe(e, clients[i].read_timeout)
                if not _not_sent(e) and not idempotent:
                    self._members.move_from(i)
                    raise _Lost(f"{self._uris[i]}: {reason}") from e
                raise NextMember(reason) from None
            except etcd.EtcdInsufficientPermissions as e:
                raise DatastoreMisconfigured(
                    f"etcd at {self._uris[i]}: etcd auth failed: {e}") from None
            except etcd.EtcdException as e:
                if type(e) is not etcd.EtcdException or "raft" not in str(e).lower():
                    raise
                # "Raft Internal Error": no leader, timed out: maybe applied
                if not idempotent:
                    self._members.move_from(i)
                    raise _Lost(f"{self._uris[i]}: {e}") from e
                raise NextMember(str(e)) from None

        return self._members.call(attempt, "etcd", self.address)

    @contextlib.contextmanager
    def _errors(self):
        """Turn every failure that is not one of ours into DatastoreUnavailable."""
        try:
            yield
        except DatastoreError:
            raise
        except etcd.EtcdConnectionFailed as e:
            raise DatastoreUnavailable(
                f"etcd at {self.address} is unreachable: {_describe(e, self.timeout)}") from e
        except etcd.EtcdException as e:
            raise DatastoreUnavailable(f"etcd at {self.address} failed: {e}") from e
        except Exception as e:  # urllib3, socket, garbage in the answer ...
            raise DatastoreUnavailable(
                f"etcd at {self.address} failed: {_describe(e, self.timeout)}") from e

    @staticmethod
    def _item(r, key: Optional[str] = None, value: Optional[str] = None) -> Item:
        return Item(r.key or key, r.value if value is None else value, int(r.modifiedIndex))

    @staticmethod
    def _leaves(r, prefix: str) -> List[Item]:
        if not r.dir:
            return []
        items = [Item(n.key, n.value if n.value is not None else "", int(n.modifiedIndex))
                 for n in r.leaves if not n.dir and n.key.startswith(prefix)]
        items.sort(key=lambda i: i.key)
        return items

    def _list(self, prefix: str, quorum: bool = True) -> Tuple[List[Item], int]:
        """Items under the directory ``prefix`` and the etcd index they are at."""
        p = normalize_prefix(_key(prefix))
        d = p.rstrip("/") or "/"
        with self._errors():
            try:
                r = self._call(lambda c: c.read(_q(d), recursive=True, quorum=quorum), True)
            except etcd.EtcdKeyNotFound as e:
                index = (e.payload or {}).get("index") if isinstance(e.payload, dict) else None
                return [], int(index or 0)
            except etcd.EtcdNotDir:
                return [], 0
            return self._leaves(r, p), int(r.etcd_index)

    # -- the interface -----------------------------------------------------

    def _get_or_none(self, key: str) -> Optional[Item]:
        with self._errors():
            try:
                r = self._call(lambda c: c.read(_q(key), quorum=True), True)
            except etcd.EtcdKeyNotFound:
                return None
            return None if r.dir else self._item(r, key)

    def get(self, key: str) -> Item:
        key = _key(key)
        item = self._get_or_none(key)
        if item is None:
            raise KeyNotFound(key)
        return item

    def _write(self, key: str, value: str, **conditions):
        if not isinstance(value, str):
            raise DatastoreError(f"datastore values must be strings, not {type(value).__name__}")
        try:
            return self._call(lambda c: c.write(_q(key), value, **conditions), False)
        except (etcd.EtcdNotFile, etcd.EtcdNotDir) as e:
            # etcd v2 keeps directories: a key cannot also be a directory
            raise DatastoreError(f"cannot write {key} in etcd at {self.address}: {e}") from None

    def _conditional(self, key: str, value: str, **cond) -> Optional[Item]:
        """Write under ``cond`` (prevIndex or prevExist=False); None when the
        condition failed.  A lost answer: re-read the key on another member.
        Unchanged: send it once more (it is conditional: it cannot land
        twice).  Holding our value: it landed.  Else the key's event history
        says whether its first change after the compared state was ours (it
        landed, someone wrote after it) or not (the condition failed)."""
        with self._errors():
            try:
                return self._item(self._write(key, value, **cond), key, value)
            except (etcd.EtcdCompareFailed, etcd.EtcdKeyNotFound, etcd.EtcdAlreadyExist):
                return None
            except _Lost as lost:
                current = self._get_or_none(key)
                unchanged = (current is None if "prevExist" in cond else
                             current is not None and current.version == cond["prevIndex"])
                if unchanged:
                    try:
                        return self._item(self._write(key, value, **cond), key, value)
                    except (etcd.EtcdCompareFailed, etcd.EtcdKeyNotFound, etcd.EtcdAlreadyExist):
                        current = self._get_or_none(key)
                    except _Lost as again:
                        raise DatastoreUnavailable(
                            f"etcd at {self.address}: write of {key} not confirmed: "
                            f"{lost}, then {again}") from None
                if current is not None and current.value == value:
                    return current
                return self._first_change_ours(key, value, cond, current, lost)

    def _first_change_ours(self, key: str, value: str, cond: dict, current: Optional[Item],
                           lost: Exception) -> Optional[Item]:
        """The key's first change after the compared state, as an Item when it
        wrote ``value`` (ours), else None; etcd's event history (its last
        1000 events) answers a watch from a past index at once.  History gone:
        DatastoreUnavailable (outcome unknown), never a guess."""
        if current is None and "prevExist" in cond:
            return None                    # created, then deleted: whose create is unknown
        try:
            if "prevExist" in cond:
                node = self._call(lambda c: c.read(_q(key), quorum=True), True)
                index = int(node.createdIndex)
            else:
                index = int(cond["prevIndex"]) + 1
            ev = self._call(lambda c: c.read(_q(key), wait=True, waitIndex=index,
                                             timeout=self.timeout), True)
        except (etcd.EtcdEventIndexCleared, etcd.EtcdKeyNotFound, etcd.EtcdException) as e:
            raise DatastoreUnavailable(
                f"etcd at {self.address}: write of {key} not confirmed ({lost}) and its "
                f"history cannot be read: {e}") from None
        if ev.action in ("set", "create", "compareAndSwap", "update") and ev.value == value:
            return Item(key, value, int(ev.modifiedIndex))
        return None

    def put(self, key: str, value: str) -> Item:
        key = _key(key)
        with self._errors():
            try:
                return self._item(self._write(key, value), key, value)
            except _Lost as lost:
                current = self._get_or_none(key)
                if current is not None and current.value == value:
                    return current
                cond = {"prevExist": False} if current is None else {"prevIndex": current.version}
                item = self._conditional(key, value, **cond)
                if item is None:
                    raise DatastoreUnavailable(
                        f"etcd at {self.address}: write of {key} not confirmed ({lost}) "
                        "and the key changed meanwhile") from None
                return item

    def create(self, key: str, value: str) -> Item:
        key = _key(key)
        item = self._conditional(key, value, prevExist=False)
        if item is None:
            raise KeyExists(key)
        return item

    def compare_and_swap(self, key: str, value: str, version: int) -> Item:
        key = _key(key)
        if int(version) <= 0:  # etcd ignores prevIndex=0
            raise CompareFailed(key)
        item = self._conditional(key, value, prevIndex=int(version))
        if item is None:
            raise CompareFailed(key)
        return item

    def delete(self, key: str, version: Optional[int] = None) -> None:
        key = _key(key)
        conditions = {}
        if version is not None:
            if int(version) <= 0:  # etcd ignores prevIndex=0
                self.get(key)          # KeyNotFound if absent
                raise CompareFailed(key)
            conditions["prevIndex"] = int(version)
        with self._errors():
            try:
                try:
                    self._call(lambda c: c.delete(_q(key), **conditions), False)
                except _Lost as lost:
                    current = self._get_or_none(key)
                    if current is None:
                        return      # gone: it landed
                    if version is not None and current.version != int(version):
                        raise CompareFailed(key) from None
                    try:
                        self._call(lambda c: c.delete(_q(key), **conditions), False)
                    except _Lost as again:
                        raise DatastoreUnavailable(
                            f"etcd at {self.address}: delete of {key} not confirmed: "
                            f"{lost}, then {again}") from None
            except (etcd.EtcdKeyNotFound, etcd.EtcdNotFile):
                raise KeyNotFound(key) from None
            except etcd.EtcdCompareFailed:
                raise CompareFailed(key) from None

    def delete_prefix(self, prefix: str) -> int:
        p = normalize_prefix(_key(prefix))
        d = p.rstrip("/") or "/"
        with self._errors():
            try:
                r = self._call(lambda c: c.read(_q(d), recursive=True, quorum=True), True)
            except (etcd.EtcdKeyNotFound, etcd.EtcdNotDir):
                return 0
            if not r.dir:
                return 0  # a plain key: nothing below it
            count = len(self._leaves(r, p))
            if d != "/":
                targets = [(d, True)]
            else:  # the root itself cannot be deleted: delete its children
                targets = [(child["key"], bool(child.get("dir"))) for child in r._children]
            for k, is_dir in targets:
                try:   # deleting a directory again is harmless: idempotent
                    if is_dir:
                        self._call(lambda c: c.delete(_q(k), recursive=True, dir=True), True)
                    else:
                        self._call(lambda c: c.delete(_q(k)), True)
                except etcd.EtcdKeyNotFound:
                    pass
            return count

    def list_prefix(self, prefix: str) -> List[Item]:
        return self._list(prefix)[0]

    def ping(self) -> None:
        with self._errors():
            self._call(lambda c: c.read("/", quorum=False), True)

    def watch_prefix(self, prefix: str, callback: Callable[[Event], None],
                     since: Optional[int] = None) -> Watch:
        p = normalize_prefix(_key(prefix))
        # own clients: a watch holds its connection while it waits
        clients = self._new_clients()
        state: Dict = {"known": None, "next": None, "member": 0}

        def start() -> None:
            items, index = self._list(p)
            state["known"] = known_versions(items, since)
            state["next"] = (index if since is None else int(since)) + 1

        return self._watchset.start(prefix, start, lambda watch: self._watch_loop(
            watch, clients, p, callback, state, start))

    def _watch_loop(self, watch: Watch, clients: List[etcd.Client], p: str, callback, state,
                    start) -> None:
        d = p.rstrip("/") or "/"
        delay = 0.2
        try:
            while not watch.stopped:
                client = clients[state["member"] % len(clients)]
                try:
                    if state["next"] is None:
                        start()
                    with self._errors():
                        try:
                            r = client.read(_q(d), wait=True, recursive=True,
                                            waitIndex=state["next"], timeout=WATCH_POLL)
                        except etcd.EtcdWatchTimedOut:
                            delay = 0.2
                            continue
                        except (etcd.EtcdEventIndexCleared, etcd.EtcdWatcherCleared):
                            # fell out of etcd's event history: re-list and diff
                            items, index = self._list(p)
                            events = diff_snapshot(state["known"], items, index)
                            state["next"] = index + 1
                        else:
                            events = self._events(r, p, state)
                    delay = 0.2
                    deliver_events(watch, callback, events)
                except DatastoreUnavailable as e:
                    if watch.stopped:
                        break
                    state["member"] += 1      # the next member, next time
                    _log.warning("watch of %s: %s; retrying in %.1f s", p, e, delay)
                    watch.wait(delay)
                    delay = min(delay * 2, MAX_BACKOFF)
        finally:
            for client in clients:
                try:
                    client.http.clear()
                except Exception:  # pragma: no cover - best effort
                    pass

    @staticmethod
    def _events(r, p: str, state) -> List[Event]:
        """Events for one etcd watch answer; updates the watch state."""
        index = int(r.modifiedIndex)
        state["next"] = index + 1
        known = state["known"]
        action = r.action
        if action in PUT_ACTIONS:
            if r.dir or not r.key.startswith(p):
                return []
            known[r.key] = index
            return [Event("put", r.key, r.value if r.value is not None else "", index)]
        if action in DELETE_ACTIONS:
            if r.dir:  # a whole directory went: one event per key we knew in it
                below = normalize_prefix(r.key)
                gone = sorted(k for k in known if k.startswith(below))
                for k in gone:
                    del known[k]
                return [Event("delete", k, None, index) for k in gone]
            if not r.key.startswith(p):
                return []
            known.pop(r.key, None)
            return [Event("delete", r.key, None, index)]
        return []  # e.g. "get": nothing changed

    def close(self) -> None:
        self._watchset.stop_all()
        with self._lock:
            clients, self._clients = self._clients, None
        for client in clients or ():
            try:
                client.http.clear()
            except Exception:  # pragma: no cover - best effort
                pass
