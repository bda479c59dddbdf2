"""The datastore interface every adapter implements.
Owns the contract (items, versions, errors, watches, update) and helpers shared by adapters.

Keys are slash-separated paths in the etcd v2 style (``/calico/v1/...``); values
are strings (JSON text where structured).  Every stored item carries an integer
``version`` (etcd's modifiedIndex, consul's ModifyIndex, the embedded store's
revision) used for compare-and-swap.

Adapters raise only the exceptions defined here; ``DatastoreUnavailable``
means the store could not be reached or answered garbage.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple, TypeVar

from netplugin.errors import PluginError


class DatastoreError(PluginError):
    """Base of every datastore exception."""


class KeyNotFound(DatastoreError):
    def __init__(self, key: str):
        super().__init__(f"datastore key not found: {key}")
        self.key = key


class KeyExists(DatastoreError):
    def __init__(self, key: str):
        super().__init__(f"datastore key already exists: {key}")
        self.key = key


class CompareFailed(DatastoreError):
    """Compare-and-swap / compare-and-delete lost: the key changed or vanished."""

    def __init__(self, key: str):
        super().__init__(f"datastore key changed concurrently: {key}")
        self.key = key


class DatastoreUnavailable(DatastoreError):
    """The datastore could not be reached (or failed in an unexpected way)."""


class TooMuchContention(DatastoreError):
    """``Datastore.update`` lost its compare-and-swap too many times in a row."""


class DatastoreMisconfigured(DatastoreUnavailable):
    """A failure waiting cannot heal: unreadable certificate files, TLS
    verification failed (wrong CA or certificate), bad credentials.  The
    plugin refuses to start on it (an unreachable store only delays)."""


@dataclass(frozen=True)
class Item:
    key: str
    value: str
    version: int


@dataclass(frozen=True)
class Event:
    action: str  # "put" or "delete"
    key: str
    value: Optional[str]  # None for "delete"
    version: int


class Watch:
    """Handle returned by ``watch_prefix``; ``stop()`` ends the watch thread."""

    def __init__(self):
        self._stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float) -> bool:
        return self._stop.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)


UPDATE_RETRIES = 50
#: Returned by an ``update`` mutator: leave the key as it is.
KEEP = object()


class Datastore(abc.ABC):
    """Abstract key-value store with optimistic concurrency."""

    name = "abstract"

    @abc.abstractmethod
    def get(self, key: str) -> Item:
        """Return the item at ``key`` or raise ``KeyNotFound``."""

    @abc.abstractmethod
    def put(self, key: str, value: str) -> Item:
        """Create or overwrite ``key``; return the stored item."""

    @abc.abstractmethod
    def create(self, key: str, value: str) -> Item:
        """Create ``key`` only if absent, else raise ``KeyExists``."""

    @abc.abstractmethod
    def compare_and_swap(self, key: str, value: str, version: int) -> Item:
        """Overwrite ``key`` only if its version is still ``version``, else raise
        ``CompareFailed`` (also when the key no longer exists)."""

    @abc.abstractmethod
    def delete(self, key: str, version: Optional[int] = None) -> None:
        """Delete ``key`` (raise ``KeyNotFound`` if absent).  With ``version``, only
        if unchanged, else raise ``CompareFailed``."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (a directory, recursively); return
        how many were deleted (0 is not an error)."""

    @abc.abstractmethod
    def list_prefix(self, prefix: str) -> List[Item]:
        """Every item under the directory ``prefix`` (keys starting with
        ``normalize_prefix(prefix)``, at any depth), sorted by key."""

    @abc.abstractmethod
    def watch_prefix(self, prefix: str, callback: Callable[[Event], None],
                     since: Optional[int] = None) -> Watch:
        """Call ``callback(event)`` from a background thread for each change under
        ``prefix`` after version ``since`` (default: from now on) until the
        returned ``Watch`` is stopped.  Reconnects by itself after failures."""

    def update(self, key: str, mutate: Callable[[Optional[Item]], Optional[str]],
               retries: int = UPDATE_RETRIES) -> Optional[Item]:
        """Read-modify-write ``key`` under compare-and-swap.

        ``mutate(item)`` gets the stored item (None when absent) and returns
        the new value: ``None`` deletes the key (nothing when absent), the
        stored value unchanged writes nothing (``KEEP`` says the same).  It
        may raise to abort (nothing is written) and is called again, with a
        fresh read, whenever a concurrent writer won.  Returns the item as
        stored afterwards (None when absent); ``TooMuchContention`` after
        ``retries`` lost races."""
        for attempt in range(retries):
            if attempt:
                time.sleep(min(0.001 * 2 ** attempt, 0.05) * random.random())
            try:
                current: Optional[Item] = self.get(key)
            except KeyNotFound:
                current = None
            value = mutate(current)
            if value is KEEP or (current is not None and value == current.value):
                return current
            try:
                if value is None:
                    if current is not None:
                        self.delete(key, current.version)
                    return None
                if current is None:
                    return self.create(key, value)
                return self.compare_and_swap(key, value, current.version)
            except (CompareFailed, KeyExists, KeyNotFound):
                continue
        raise TooMuchContention(f"datastore key {key} changed concurrently {retries} "
                                f"times in a row; not updated")

    def ping(self) -> None:
        """Raise ``DatastoreUnavailable`` if the store cannot be reached."""
        self.list_prefix("/netplugin/ping")

    def close(self) -> None:
        """Release connections and stop watches started by this object."""


_log = logging.getLogger("netplugin.datastore")


def diff_snapshot(known: Dict[str, int], items: List[Item], now: int) -> List[Event]:
    """Events turning the state ``known`` (key -> version) into ``items``;
    updates ``known`` in place.  Watches use it to resync from a listing."""
    current = {i.key: i for i in items}
    puts = sorted((i for i in items if known.get(i.key) != i.version),
                  key=lambda i: (i.version, i.key))
    events = [Event("put", i.key, i.value, i.version) for i in puts]
    events += [Event("delete", k, None, now) for k in sorted(known) if k not in current]
    known.clear()
    known.update({i.key: i.version for i in items})
    return events


def deliver_event(callback: Callable[[Event], None], event: Event) -> None:
    """Call a watch callback; a broken callback must not end the watch."""
    try:
        callback(event)
    except Exception:
        _log.exception("watch callback failed on %s", event)


def deliver_events(watch: Watch, callback: Callable[[Event], None],
                   events: List[Event]) -> None:
    """Deliver ``events`` in order, none after the watch was stopped."""
    for event in events:
        if watch.stopped:
            return
        deliver_event(callback, event)


def known_versions(items: List[Item], since: Optional[int]) -> Dict[str, int]:
    """The key -> version map a watch diffs against: every listed item, or
    (watching from ``since``) those not changed after it."""
    return {i.key: i.version for i in items if since is None or i.version <= since}


class WatchSet:
    """The watch threads an adapter object started; ``stop_all`` (its close())
    ends them.  Shared by the adapters so each only writes its own loop."""

    def __init__(self):
        self._lock = threading.Lock()
        self._watches: List[Watch] = []

    def start(self, prefix: str, start: Callable[[], None],
              loop: Callable[[Watch], None]) -> Watch:
        """Run ``start()`` now ("from now" means from this call on; a store
        that is down only delays it: ``loop`` must call it again then), then
        ``loop(watch)`` in a daemon thread."""
        watch = Watch()
        try:
            start()
        except DatastoreUnavailable as e:
            _log.warning("watch of %s starts late: %s", prefix, e)
        watch.thread = threading.Thread(target=loop, args=(watch,),
                                        name=f"watch {prefix}", daemon=True)
        with self._lock:
            self._watches = [w for w in self._watches if not w.stopped] + [watch]
        watch.thread.start()
        return watch

    def stop_all(self) -> None:
        with self._lock:
            watches, self._watches = self._watches, []
        for w in watches:
            w.stop()


@contextlib.contextmanager
def watching(datastore: "Datastore",
             callbacks: Mapping[str, Callable[[Event], None]]) -> Iterator[List[Watch]]:
    """Watch every prefix of ``callbacks`` (prefix -> callback) for the
    duration of the ``with`` block; every watch is stopped when it ends."""
    watches: List[Watch] = []
    try:
        for prefix, callback in callbacks.items():
            watches.append(datastore.watch_prefix(prefix, callback))
        yield watches
    finally:
        for w in watches:
            try:
                w.stop()
            except Exception:  # pragma: no cover - best effort
                _log.debug("cannot stop a watch", exc_info=True)


def normalize_prefix(prefix: str) -> str:
    """``/a/b`` and ``/a/b/`` both mean the directory ``/a/b/`` for listing."""
    return prefix if prefix.endswith("/") else prefix + "/"


def parse_http_address(text: str, what: str, default_port: int, want: str
                       ) -> Tuple[str, str, int]:
    """``[http[s]://]host[:port]`` -> (scheme, host name without brackets, port);
    DatastoreError ``bad <what> '<text>': <reason>`` otherwise."""
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or default_port
    except ValueError as e:
        raise DatastoreError(f"bad {what} {text!r}: {e}") from None
    if not parts.hostname or parts.scheme not in ("http", "https"):
        raise DatastoreError(f"bad {what} {text!r}: want {want}")
    return parts.scheme, parts.hostname, port


def bracketed(host: str) -> str:
    """An IPv6 literal in brackets, for a URL; other hosts unchanged."""
    return f"[{host}]" if ":" in host else host


def endpoint_list(endpoints, what: str) -> List[str]:
    """``endpoints`` as a list (a string may hold several, comma or space
    separated); DatastoreError when there is none."""
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.replace(",", " ").split() if e]
    if not endpoints:
        raise DatastoreError(f"no {what} endpoints configured")
    return list(endpoints)


T = TypeVar("T")


class NextMember(Exception):
    """One attempt on one cluster member failed before anything was applied
    (or was idempotent): ``Members.call`` tries the next one."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Members:
    """Failover over a cluster's members, shared by the etcd adapters.  A
    call starts on the member that last answered and goes round the others
    (pausing ``pause`` between rounds: an election in progress) until one
    answers or ``timeout`` is spent.  The adapter's attempt decides what a
    failure means: ``NextMember`` moves on; any other exception ends the
    call (a write that may have been applied calls ``move_from`` first)."""

    def __init__(self, uris: List[str], timeout: float, pause: float = 0.1):
        self.uris, self.timeout, self.pause = list(uris), timeout, pause
        self._lock = threading.Lock()
        self._current = 0

    @property
    def current(self) -> int:
        with self._lock:
            return self._current

    def move_from(self, index: int) -> None:
        with self._lock:
            if self._current == index:
                self._current = (index + 1) % len(self.uris)

    def call(self, attempt: Callable[[int, float], T], name: str, address: str) -> T:
        """``attempt(index, seconds_left)`` on each member in turn;
        DatastoreUnavailable naming every member's reason when none answered."""
        deadline = time.monotonic() + self.timeout
        n = len(self.uris)
        reasons: Dict[str, str] = {}
        while True:
            start = self.current
            for step in range(n):
                index = (start + step) % n
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    result = attempt(index, left)
                except NextMember as e:
                    reasons[self.uris[index]] = e.reason
                    continue
                if index != start:
                    with self._lock:
                        self._current = index
                return result
            if time.monotonic() + self.pause >= deadline:
                break
            time.sleep(self.pause)
        within = f"no answer within {self.timeout:g} s"
        reasons = {u: within if r == "no answer in time" else r for u, r in reasons.items()}
        words = sorted(set(reasons.values())) or [within]
        word = words[0] if len(words) == 1 else "; ".join(f"{u}: {r}" for u, r in reasons.items())
        raise DatastoreUnavailable(f"{name} at {address} is unreachable: {word}")
