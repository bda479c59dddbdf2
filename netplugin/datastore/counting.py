"""A wrapper that counts reads, writes and deletes per call (the per-call
cost in the log and the tests) and feeds the datastore metrics."""
from __future__ import annotations

import threading
from collections import Counter
from typing import Callable, List, Optional

from netplugin import metrics
from netplugin.datastore.base import (
    CompareFailed, Datastore, Event, Item, KeyExists, KeyNotFound, Watch)

READS = ("get", "list_prefix")
WRITES = ("put", "create", "compare_and_swap")
DELETES = ("delete", "delete_prefix")
KIND_NAMES = {"R": "read", "W": "write", "D": "delete"}


class CountingDatastore(Datastore):
    """Delegates to ``inner`` and counts operations as R (reads), W (writes)
    and D (deletes), the way Calico's README table counts them.

    Counts are kept per thread, so the app can measure each request it
    serves: ``reset()`` before the call, ``counts`` / ``log`` after it."""

    def __init__(self, inner: Datastore):
        self.inner = inner
        self.name = inner.name
        self._local = threading.local()

    def _state(self):
        st = self._local
        if not hasattr(st, "ops"):
            st.ops = Counter()
            st.log = []
        return st

    def reset(self) -> None:
        st = self._state()
        st.ops.clear()
        st.log.clear()

    def _count(self, op: str, key: str) -> str:
        kind = "R" if op in READS else "W" if op in WRITES else "D"
        st = self._state()
        st.ops[kind] += 1
        st.log.append((kind, op, key))
        return kind

    def _call(self, op: str, key: str, fn: Callable, *args):
        kind = KIND_NAMES[self._count(op, key)]
        try:
            result = fn(*args)
        except KeyNotFound:
            metrics.observe_datastore(kind, op, "not_found")
            raise
        except (KeyExists, CompareFailed):
            metrics.observe_datastore(kind, op, "conflict")
            raise
        except BaseException:
            metrics.observe_datastore(kind, op, "error")
            raise
        metrics.observe_datastore(kind, op, "ok")
        return result

    @property
    def log(self) -> List[tuple]:
        """(kind, operation, key) of every operation since ``reset()``."""
        return list(self._state().log)

    @property
    def counts(self) -> dict:
        ops = self._state().ops
        return {"R": ops["R"], "W": ops["W"], "D": ops["D"]}

    def summary(self) -> str:
        c = self.counts
        return f"{c['R']}R {c['W']}W {c['D']}D"

    def get(self, key: str) -> Item:
        return self._call("get", key, self.inner.get, key)

    def put(self, key: str, value: str) -> Item:
        return self._call("put", key, self.inner.put, key, value)

    def create(self, key: str, value: str) -> Item:
        return self._call("create", key, self.inner.create, key, value)

    def compare_and_swap(self, key: str, value: str, version: int) -> Item:
        return self._call("compare_and_swap", key, self.inner.compare_and_swap, key, value, version)

    def delete(self, key: str, version: Optional[int] = None) -> None:
        return self._call("delete", key, self.inner.delete, key, version)

    def delete_prefix(self, prefix: str) -> int:
        return self._call("delete_prefix", prefix, self.inner.delete_prefix, prefix)

    def list_prefix(self, prefix: str) -> List[Item]:
        return self._call("list_prefix", prefix, self.inner.list_prefix, prefix)

    def watch_prefix(self, prefix: str, callback: Callable[[Event], None],
                     since: Optional[int] = None) -> Watch:
        return self.inner.watch_prefix(prefix, callback, since)

    def ping(self) -> None:
        self.inner.ping()

    def close(self) -> None:
        self.inner.close()
