"""The etcd datastore (etcd v2 API through python-etcd).

``version`` is etcd's ``modifiedIndex``.  Reads are quorum reads.  Several
endpoints give python-etcd's host tuple with ``allow_reconnect``: a request
that cannot reach one endpoint is tried on the next.

etcd v2 keeps directories: deleting the last key of a directory leaves the
(empty) directory behind; directories never show up as items.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import urllib.parse
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import etcd
import urllib3
from urllib3.exceptions import ConnectTimeoutError, ReadTimeoutError

from netplugin.datastore.base import (
    CompareFailed, Datastore, DatastoreError, DatastoreUnavailable, Event, Item,
    KeyExists, KeyNotFound, Watch, WatchSet, deliver_events, diff_snapshot,
    known_versions, normalize_prefix)

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


def _parse_endpoint(endpoint: str) -> Tuple[str, str, int]:
    """``http://host:port`` -> (protocol, host, port)."""
    text = endpoint.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as e:
        raise DatastoreError(f"bad etcd endpoint {endpoint!r}: {e}") from None
    host = parts.hostname
    if not host or parts.scheme not in ("http", "https"):
        raise DatastoreError(f"bad etcd endpoint {endpoint!r}: want http://host:port")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return parts.scheme, host, port


def _key(key: str) -> str:
    return key if key.startswith("/") else "/" + key


def _q(key: str) -> str:
    """Percent-encode a key for the URL path (python-etcd does not)."""
    return urllib.parse.quote(key, safe="/")


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


class EtcdDatastore(Datastore):
    name = "etcd"

    def __init__(self, endpoints: Sequence[str] = ("http://127.0.0.1:2379",),
                 timeout: float = 5.0):
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.replace(",", " ").split() if e]
        if not endpoints:
            raise DatastoreError("no etcd endpoints configured")
        self._endpoints = [_parse_endpoint(e) for e in endpoints]
        self._uris = [f"{p}://{h}:{port}" for p, h, port in self._endpoints]
        self.address = ", ".join(self._uris)
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._client: Optional[etcd.Client] = None
        self._watchset = WatchSet()

    @classmethod
    def from_config(cls, cfg) -> "EtcdDatastore":
        return cls(cfg.endpoints, cfg.timeout)

    def __repr__(self):
        return f"EtcdDatastore({self.address})"

    # -- plumbing ----------------------------------------------------------

    def _new_client(self) -> etcd.Client:
        protocol = self._endpoints[0][0]
        with self._errors():
            if len(self._endpoints) == 1:
                _, host, port = self._endpoints[0]
                client = etcd.Client(host=host, port=port, protocol=protocol,
                                     read_timeout=self.timeout, allow_reconnect=False)
            else:
                hosts = tuple((h, port) for _, h, port in self._endpoints)
                # use_proxies: take our list as it is, do not ask the cluster
                # for its member list (which may hold unreachable addresses).
                client = etcd.Client(host=hosts, protocol=protocol,
                                     read_timeout=self.timeout, allow_reconnect=True,
                                     use_proxies=True)
            client.http = urllib3.PoolManager(num_pools=10, maxsize=10,
                                              timeout=self.timeout, retries=_RETRIES)
        return client

    def _get_client(self) -> etcd.Client:
        with self._lock:
            if self._client is None:
                self._client = self._new_client()
            client = self._client
        self._rearm(client)
        return client

    def _rearm(self, client: etcd.Client) -> None:
        """python-etcd forgets each endpoint that failed once (with
        use_proxies it never relearns them): offer all the others again."""
        if len(self._uris) > 1:
            current = getattr(client, "_base_uri", None)
            client._machines_cache = [u for u in self._uris if u != current]

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

    def _list(self, client: etcd.Client, prefix: str, quorum: bool = True
              ) -> Tuple[List[Item], int]:
        """Items under the directory ``prefix`` and the etcd index they are at."""
        p = normalize_prefix(_key(prefix))
        d = p.rstrip("/") or "/"
        with self._errors():
            try:
                r = client.read(_q(d), recursive=True, quorum=quorum)
            except etcd.EtcdKeyNotFound as e:
                index = (e.payload or {}).get("index") if isinstance(e.payload, dict) else None
                return [], int(index or 0)
            except etcd.EtcdNotDir:
                return [], 0
            return self._leaves(r, p), int(r.etcd_index)

    # -- the interface -----------------------------------------------------

    def get(self, key: str) -> Item:
        key = _key(key)
        with self._errors():
            try:
                r = self._get_client().read(_q(key), quorum=True)
            except etcd.EtcdKeyNotFound:
                raise KeyNotFound(key) from None
            if r.dir:
                raise KeyNotFound(key)
            return self._item(r, key)

    def _write(self, key: str, value: str, **conditions):
        if not isinstance(value, str):
            raise DatastoreError(f"datastore values must be strings, not {type(value).__name__}")
        try:
            return self._get_client().write(_q(key), value, **conditions)
        except (etcd.EtcdNotFile, etcd.EtcdNotDir) as e:
            # etcd v2 keeps directories: a key cannot also be a directory
            raise DatastoreError(f"cannot write {key} in etcd at {self.address}: {e}") from None

    def put(self, key: str, value: str) -> Item:
        key = _key(key)
        with self._errors():
            return self._item(self._write(key, value), key, value)

    def create(self, key: str, value: str) -> Item:
        key = _key(key)
        with self._errors():
            try:
                r = self._write(key, value, prevExist=False)
            except etcd.EtcdAlreadyExist:
                raise KeyExists(key) from None
            return self._item(r, key, value)

    def compare_and_swap(self, key: str, value: str, version: int) -> Item:
        key = _key(key)
        if int(version) <= 0:  # etcd ignores prevIndex=0
            raise CompareFailed(key)
        with self._errors():
            try:
                r = self._write(key, value, prevIndex=int(version))
            except (etcd.EtcdCompareFailed, etcd.EtcdKeyNotFound):
                raise CompareFailed(key) from None
            return self._item(r, key, value)

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
                self._get_client().delete(_q(key), **conditions)
            except (etcd.EtcdKeyNotFound, etcd.EtcdNotFile):
                raise KeyNotFound(key) from None
            except etcd.EtcdCompareFailed:
                raise CompareFailed(key) from None

    def delete_prefix(self, prefix: str) -> int:
        p = normalize_prefix(_key(prefix))
        d = p.rstrip("/") or "/"
        client = self._get_client()
        with self._errors():
            try:
                r = client.read(_q(d), recursive=True, quorum=True)
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
                try:
                    if is_dir:
                        client.delete(_q(k), recursive=True, dir=True)
                    else:
                        client.delete(_q(k))
                except etcd.EtcdKeyNotFound:
                    pass
            return count

    def list_prefix(self, prefix: str) -> List[Item]:
        return self._list(self._get_client(), prefix)[0]

    def ping(self) -> None:
        with self._errors():
            self._get_client().read("/", quorum=False)

    def watch_prefix(self, prefix: str, callback: Callable[[Event], None],
                     since: Optional[int] = None) -> Watch:
        p = normalize_prefix(_key(prefix))
        # own client: a watch holds its connection while it waits
        client = self._new_client()
        state: Dict = {"known": None, "next": None}

        def start() -> None:
            items, index = self._list(client, p)
            state["known"] = known_versions(items, since)
            state["next"] = (index if since is None else int(since)) + 1

        return self._watchset.start(prefix, start, lambda watch: self._watch_loop(
            watch, client, p, callback, state, start))

    def _watch_loop(self, watch: Watch, client: etcd.Client, p: str, callback, state,
                    start) -> None:
        d = p.rstrip("/") or "/"
        delay = 0.2
        try:
            while not watch.stopped:
                try:
                    if state["next"] is None:
                        start()
                    self._rearm(client)
                    with self._errors():
                        try:
                            r = client.read(_q(d), wait=True, recursive=True,
                                            waitIndex=state["next"], timeout=WATCH_POLL)
                        except etcd.EtcdWatchTimedOut:
                            delay = 0.2
                            continue
                        except (etcd.EtcdEventIndexCleared, etcd.EtcdWatcherCleared):
                            # fell out of etcd's event history: re-list and diff
                            items, index = self._list(client, p)
                            events = diff_snapshot(state["known"], items, index)
                            state["next"] = index + 1
                        else:
                            events = self._events(r, p, state)
                    delay = 0.2
                    deliver_events(watch, callback, events)
                except DatastoreUnavailable as e:
                    if watch.stopped:
                        break
                    _log.warning("watch of %s: %s; retrying in %.1f s", p, e, delay)
                    watch.wait(delay)
                    delay = min(delay * 2, MAX_BACKOFF)
        finally:
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
            client, self._client = self._client, None
        if client is not None:
            try:
                client.http.clear()
            except Exception:  # pragma: no cover - best effort
                pass
