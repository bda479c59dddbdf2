"""A wrapper that counts reads, writes and deletes per call (tests, metrics)."""
from __future__ import annotations

import threading
from collections import Counter
from typing import Callable, List, Optional

from netplugin.datastore.base import Datastore, Event, Item, Watch

READS = ("get", "list_prefix")
WRITES = ("put", "create", "compare_and_swap")
DELETES = ("delete", "delete_prefix")


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

    def _count(self, op: str, key: str) -> None:
        kind = "R" if op in READS else "W" if op in WRITES else "D"
        st = self._state()
        st.ops[kind] += 1
        st.log.append((kind, op, key))

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
        self._count("get", key)
        return self.inner.get(key)

    def put(self, key: str, value: str) -> Item:
        self._count("put", key)
        return self.inner.put(key, value)

    def create(self, key: str, value: str) -> Item:
        self._count("create", key)
        return self.inner.create(key, value)

    def compare_and_swap(self, key: str, value: str, version: int) -> Item:
        self._count("compare_and_swap", key)
        return self.inner.compare_and_swap(key, value, version)

    def delete(self, key: str, version: Optional[int] = None) -> None:
        self._count("delete", key)
        return self.inner.delete(key, version)

    def delete_prefix(self, prefix: str) -> int:
        self._count("delete_prefix", prefix)
        return self.inner.delete_prefix(prefix)

    def list_prefix(self, prefix: str) -> List[Item]:
        self._count("list_prefix", prefix)
        return self.inner.list_prefix(prefix)

    def watch_prefix(self, prefix: str, callback: Callable[[Event], None],
                     since: Optional[int] = None) -> Watch:
        return self.inner.watch_prefix(prefix, callback, since)

    def ping(self) -> None:
        self.inner.ping()

    def close(self) -> None:
        self.inner.close()
