"""The embedded datastore: one sqlite3 file, no server.
Owns the sqlite schema, its change log for watches and its locking.

Safe for several processes (gunicorn workers) and threads at once: the file is
in WAL mode, every connection has a busy timeout, each thread has its own
connection, and every write is a ``BEGIN IMMEDIATE`` transaction.

A global revision counter (table ``meta``) is bumped once per write
transaction; it is the ``version`` of every item written by that transaction.
Each change is also appended to the ``changes`` table, which watches poll;
old rows are pruned (about the last ``CHANGE_LOG_ROWS`` rows are kept) and a
watch that fell behind the pruned part re-lists its prefix instead.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
from typing import Callable, List, Optional, Tuple

from netplugin.datastore.base import (
    CompareFailed, Datastore, DatastoreError, DatastoreUnavailable, Event, Item,
    KeyExists, KeyNotFound, Watch, WatchSet, deliver_events, diff_snapshot,
    known_versions, normalize_prefix)

_log = logging.getLogger(__name__)

CHANGE_LOG_ROWS = 10000   # keep about this many rows of change log
PRUNE_EVERY = 100         # revisions between two prunes
POLL_INTERVAL = 0.1       # seconds between two polls of a watch
MIN_BUSY_TIMEOUT = 5.0    # seconds a writer waits for the file lock, at least
CACHE_KIB = 256           # page cache per connection (sqlite3 default: 2000 KiB)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv ("
    " key TEXT PRIMARY KEY, value TEXT NOT NULL, version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS changes ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, revision INTEGER NOT NULL,"
    " action TEXT NOT NULL, key TEXT NOT NULL, value TEXT)",
    "CREATE INDEX IF NOT EXISTS changes_revision ON changes (revision)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0)",
    # every revision <= compacted may have been pruned from the change log
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('compacted', 0)",
)


def _key(key: str) -> str:
    return key if key.startswith("/") else "/" + key


def _bounds(prefix: str) -> Tuple[str, str]:
    """[low, high) holding exactly the keys that start with the directory
    ``normalize_prefix(prefix)``: '0' is the character right after '/'."""
    p = normalize_prefix(_key(prefix))
    return p, p[:-1] + "0"


class EmbeddedDatastore(Datastore):
    name = "embedded"

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = path
        self.busy_timeout = max(float(timeout), MIN_BUSY_TIMEOUT)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: List[sqlite3.Connection] = []
        self._generation = 0
        self._watchset = WatchSet()
        try:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise self._unavailable(e) from e
        self._init_schema()

    @classmethod
    def from_config(cls, cfg) -> "EmbeddedDatastore":
        return cls(cfg.path, cfg.timeout)

    def __repr__(self):
        return f"EmbeddedDatastore({self.path!r})"

    # -- connections -------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> DatastoreUnavailable:
        reason = str(exc) or type(exc).__name__
        return DatastoreUnavailable(
            f"embedded datastore at {self.path} is unavailable: {reason}")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout,
                               isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                _log.warning("%s: sqlite journal mode is %s, not wal", self.path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one after fork() or close())."""
        st = self._local
        pid = os.getpid()
        if (getattr(st, "conn", None) is None or st.pid != pid
                or st.generation != self._generation):
            try:
                conn = self._connect()
            except sqlite3.Error as e:
                raise self._unavailable(e) from e
            st.conn, st.pid, st.generation = conn, pid, self._generation
            with self._lock:
                self._conns.append(conn)
        return st.conn

    def _init_schema(self) -> None:
        def create(conn):
            for stmt in _SCHEMA:
                conn.execute(stmt)
        self._write(create)

    def _write(self, fn):
        """Run ``fn(conn)`` inside one ``BEGIN IMMEDIATE`` transaction."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise
            conn.execute("COMMIT")
            return result
        except DatastoreError:
            raise
        except sqlite3.Error as e:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise self._unavailable(e) from e

    def _read(self, fn):
        """Run ``fn(conn)`` inside one read transaction (a consistent snapshot)."""
        conn = self._conn()
        try:
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise self._unavailable(e) from e

    @staticmethod
    def _next_revision(conn) -> int:
        conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        rev = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
        if rev % PRUNE_EVERY == 0:
            EmbeddedDatastore._prune(conn)
        return rev

    @staticmethod
    def _prune(conn) -> None:
        row = conn.execute("SELECT revision FROM changes ORDER BY id DESC LIMIT 1 OFFSET ?",
                           (CHANGE_LOG_ROWS,)).fetchone()
        if row is None:
            return
        below = row[0]  # drop whole revisions older than this one
        conn.execute("DELETE FROM changes WHERE revision < ?", (below,))
        conn.execute("UPDATE meta SET value = MAX(value, ?) WHERE name = 'compacted'",
                     (below - 1,))

    @staticmethod
    def _log_change(conn, rev: int, action: str, key: str, value: Optional[str]) -> None:
        conn.execute("INSERT INTO changes (revision, action, key, value) VALUES (?, ?, ?, ?)",
                     (rev, action, key, value))

    # -- the interface -----------------------------------------------------

    def get(self, key: str) -> Item:
        key = _key(key)
        try:
            row = self._conn().execute(
                "SELECT value, version FROM kv WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as e:
            raise self._unavailable(e) from e
        if row is None:
            raise KeyNotFound(key)
        return Item(key, row[0], row[1])

    def _store(self, conn, key: str, value: str) -> Item:
        rev = self._next_revision(conn)
        conn.execute("INSERT OR REPLACE INTO kv (key, value, version) VALUES (?, ?, ?)",
                     (key, value, rev))
        self._log_change(conn, rev, "put", key, value)
        return Item(key, value, rev)

    @staticmethod
    def _check_value(value) -> str:
        if not isinstance(value, str):
            raise DatastoreError(f"datastore values must be strings, not {type(value).__name__}")
        return value

    def put(self, key: str, value: str) -> Item:
        key, value = _key(key), self._check_value(value)
        return self._write(lambda conn: self._store(conn, key, value))

    def create(self, key: str, value: str) -> Item:
        key, value = _key(key), self._check_value(value)

        def txn(conn):
            if conn.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone():
                raise KeyExists(key)
            return self._store(conn, key, value)
        return self._write(txn)

    def compare_and_swap(self, key: str, value: str, version: int) -> Item:
        key, value = _key(key), self._check_value(value)

        def txn(conn):
            row = conn.execute("SELECT version FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None or row[0] != version:
                raise CompareFailed(key)
            return self._store(conn, key, value)
        return self._write(txn)

    def delete(self, key: str, version: Optional[int] = None) -> None:
        key = _key(key)

        def txn(conn):
            row = conn.execute("SELECT version FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise KeyNotFound(key)
            if version is not None and row[0] != version:
                raise CompareFailed(key)
            rev = self._next_revision(conn)
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            self._log_change(conn, rev, "delete", key, None)
        self._write(txn)

    def delete_prefix(self, prefix: str) -> int:
        low, high = _bounds(prefix)

        def txn(conn):
            keys = [r[0] for r in conn.execute(
                "SELECT key FROM kv WHERE key >= ? AND key < ? ORDER BY key", (low, high))]
            if not keys:
                return 0
            rev = self._next_revision(conn)
            conn.execute("DELETE FROM kv WHERE key >= ? AND key < ?", (low, high))
            conn.executemany(
                "INSERT INTO changes (revision, action, key, value) VALUES (?, 'delete', ?, NULL)",
                [(rev, k) for k in keys])
            return len(keys)
        return self._write(txn)

    @staticmethod
    def _list(conn, low: str, high: str) -> List[Item]:
        return [Item(k, v, ver) for k, v, ver in conn.execute(
            "SELECT key, value, version FROM kv WHERE key >= ? AND key < ? ORDER BY key",
            (low, high))]

    def list_prefix(self, prefix: str) -> List[Item]:
        low, high = _bounds(prefix)
        try:
            return self._list(self._conn(), low, high)
        except sqlite3.Error as e:
            raise self._unavailable(e) from e

    def _meta(self, conn) -> Tuple[int, int]:
        rows = dict(conn.execute("SELECT name, value FROM meta"))
        return rows["revision"], rows["compacted"]

    def watch_prefix(self, prefix: str, callback: Callable[[Event], None],
                     since: Optional[int] = None) -> Watch:
        low, high = _bounds(prefix)
        state = {"known": None, "last": None}

        def start(conn):
            rev, _ = self._meta(conn)
            items = self._list(conn, low, high)
            state["last"] = rev if since is None else int(since)
            state["known"] = known_versions(items, since)

        def run(watch: Watch) -> None:
            try:
                self._watch_loop(watch, low, high, callback, state, start)
            finally:
                self._forget_thread_conn()

        return self._watchset.start(prefix, lambda: self._read(start), run)

    def _forget_thread_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _watch_loop(self, watch: Watch, low: str, high: str, callback, state, start) -> None:
        delay = POLL_INTERVAL
        while not watch.stopped:
            try:
                if state["last"] is None:
                    self._read(start)
                events = self._read(lambda conn: self._poll(conn, low, high, state))
                delay = POLL_INTERVAL
            except DatastoreUnavailable as e:
                _log.warning("watch: %s; retrying", e)
                delay = min(delay * 2, 5.0)
                events = []
            deliver_events(watch, callback, events)
            watch.wait(delay)

    def _poll(self, conn, low: str, high: str, state) -> List[Event]:
        last, known = state["last"], state["known"]
        rev, compacted = self._meta(conn)
        if rev <= last:
            return []
        if last < compacted:
            # we fell behind the pruned change log: re-list and diff
            items = self._list(conn, low, high)
            events = diff_snapshot(known, items, rev)
        else:
            events = [Event(action, key, value, r) for r, action, key, value in conn.execute(
                "SELECT revision, action, key, value FROM changes"
                " WHERE revision > ? AND key >= ? AND key < ? ORDER BY id",
                (last, low, high))]
            for e in events:
                if e.action == "put":
                    known[e.key] = e.version
                else:
                    known.pop(e.key, None)
        state["last"] = rev
        return events

    def close(self) -> None:
        self._watchset.stop_all()
        with self._lock:
            conns, self._conns = self._conns, []
            self._generation += 1
        for c in conns:
            try:
                c.close()
            except sqlite3.Error:
                pass
