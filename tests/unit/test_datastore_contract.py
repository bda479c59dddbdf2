"""One contract suite for every datastore adapter, run against real servers.

``store`` is parametrized over the adapters: embedded (a sqlite file, always),
etcd (a real etcd, always) and consul (a real agent when a ``consul`` binary
is installed, else skipped).  Each test works below its own random ``root``.
"""
from __future__ import annotations

import json
import multiprocessing
import threading
import time
import uuid

import pytest

from netplugin.config import DatastoreConfig
from netplugin.datastore import (
    KEEP, CompareFailed, CountingDatastore, DatastoreUnavailable, Event, Item, KeyExists,
    KeyNotFound, TooMuchContention, open_datastore)
from netplugin.datastore.consul import ConsulDatastore
from netplugin.datastore.embedded import EmbeddedDatastore
from netplugin.datastore.etcd import EtcdDatastore
from tests.datastore_servers import (  # noqa: F401  (fixtures used by name)
    consul_address, etcd_endpoint, free_port, garbage_server, run_etcd, silent_server)
from tests.waiting import wait_for

ADAPTERS = ["embedded", "etcd", "etcdv3", "consul"]


@pytest.fixture(params=ADAPTERS)
def store(request, tmp_path):
    kind = request.param
    if kind == "embedded":
        cfg = DatastoreConfig(type="embedded", path=str(tmp_path / "sub" / "dir" / "state.db"))
    elif kind in ("etcd", "etcdv3"):  # one etcd serves both APIs (separate keyspaces)
        cfg = DatastoreConfig(type=kind, endpoints=[request.getfixturevalue("etcd_endpoint")])
    else:
        cfg = DatastoreConfig(type="consul", address=request.getfixturevalue("consul_address"))
    ds = open_datastore(cfg)
    assert ds.name == kind
    try:
        yield ds
    finally:
        ds.close()


@pytest.fixture
def root(store):
    """A fresh directory for one test; removed afterwards."""
    path = f"/test/{uuid.uuid4().hex[:12]}"
    yield path
    store.delete_prefix(path)


def triples(events):
    return [(e.action, e.key, e.value) for e in events]


# -- get / put / create ----------------------------------------------------

VALUES = [
    "plain",
    "",
    json.dumps({"name": "ünïcødé ✓ 网络", "ips": ["10.0.0.1/32"], "n": 3}, ensure_ascii=False),
    json.dumps({"escaped": "\u00e9\n\"quoted\""}),
    "line one\nline two\n\ttabbed",
]


def test_get_missing_key(store, root):
    with pytest.raises(KeyNotFound) as exc:
        store.get(f"{root}/missing")
    assert exc.value.key == f"{root}/missing"


@pytest.mark.parametrize("value", VALUES, ids=["plain", "empty", "unicode-json", "json", "lines"])
def test_put_get_roundtrip(store, root, value):
    key = f"{root}/calico/v1/host/h1/workload/docker/ep1"
    item = store.put(key, value)
    assert isinstance(item, Item)
    assert (item.key, item.value) == (key, value)
    assert isinstance(item.version, int) and item.version > 0
    assert store.get(key) == item


def test_put_overwrites_with_a_newer_version(store, root):
    key = f"{root}/k"
    first = store.put(key, "1")
    second = store.put(key, "2")
    assert second.version > first.version
    assert store.get(key) == Item(key, "2", second.version)


def test_key_with_odd_characters(store, root):
    key = f"{root}/odd/a b?c#d%e+f&g=h;ü"
    item = store.put(key, "v")
    assert store.get(key) == item
    assert store.list_prefix(f"{root}/odd") == [item]


def test_create_only_if_absent(store, root):
    key = f"{root}/pool/10.0.0.0-24"
    item = store.create(key, "owner-a")
    assert item.value == "owner-a" and item.version > 0
    with pytest.raises(KeyExists) as exc:
        store.create(key, "owner-b")
    assert exc.value.key == key
    assert store.get(key) == item
    store.delete(key)
    assert store.create(key, "owner-c").value == "owner-c"


# -- compare-and-swap / delete ---------------------------------------------

def test_compare_and_swap(store, root):
    key = f"{root}/cas"
    v1 = store.put(key, "a")
    v2 = store.compare_and_swap(key, "b", v1.version)
    assert v2.value == "b" and v2.version > v1.version
    assert store.get(key) == v2
    with pytest.raises(CompareFailed) as exc:
        store.compare_and_swap(key, "c", v1.version)  # stale
    assert exc.value.key == key
    with pytest.raises(CompareFailed):
        store.compare_and_swap(key, "c", 0)
    assert store.get(key).value == "b"


def test_compare_and_swap_on_vanished_key(store, root):
    key = f"{root}/gone"
    item = store.put(key, "a")
    store.delete(key)
    with pytest.raises(CompareFailed):
        store.compare_and_swap(key, "b", item.version)
    with pytest.raises(CompareFailed):
        store.compare_and_swap(f"{root}/never-existed", "b", item.version)
    with pytest.raises(KeyNotFound):
        store.get(key)


def test_delete(store, root):
    key = f"{root}/d"
    with pytest.raises(KeyNotFound):
        store.delete(key)
    store.put(key, "x")
    store.delete(key)
    with pytest.raises(KeyNotFound):
        store.get(key)
    with pytest.raises(KeyNotFound):
        store.delete(key)


def test_delete_with_version(store, root):
    key = f"{root}/dv"
    old = store.put(key, "1")
    new = store.put(key, "2")
    with pytest.raises(CompareFailed):
        store.delete(key, old.version)
    assert store.get(key) == new
    store.delete(key, new.version)
    with pytest.raises(KeyNotFound):
        store.get(key)
    with pytest.raises(KeyNotFound):  # absent: KeyNotFound, whatever the version
        store.delete(key, new.version)


# -- directories -----------------------------------------------------------

def _tree(store, root):
    keys = [f"{root}/r/a", f"{root}/r/b/c", f"{root}/r/b/d/e", f"{root}/r/b/d/f",
            f"{root}/r/bb", f"{root}/rx/a", f"{root}/r2"]
    return {k: store.put(k, f"value of {k}") for k in keys}


def test_list_prefix_is_a_directory_listing(store, root):
    items = _tree(store, root)
    expected = [items[k] for k in sorted([f"{root}/r/b/c", f"{root}/r/b/d/e", f"{root}/r/b/d/f"])]
    assert store.list_prefix(f"{root}/r/b") == expected
    assert store.list_prefix(f"{root}/r/b/") == expected
    everything = store.list_prefix(f"{root}/r")
    assert [i.key for i in everything] == sorted(
        [f"{root}/r/a", f"{root}/r/b/c", f"{root}/r/b/d/e", f"{root}/r/b/d/f", f"{root}/r/bb"])
    assert everything == sorted(everything, key=lambda i: i.key)
    assert store.list_prefix(root) == sorted(items.values(), key=lambda i: i.key)
    assert store.list_prefix(f"{root}/nothing/here") == []
    assert store.list_prefix(f"{root}/r/a") == []  # a key, not a directory


def test_delete_prefix(store, root):
    items = _tree(store, root)
    assert store.delete_prefix(f"{root}/r/b") == 3
    assert [i.key for i in store.list_prefix(f"{root}/r")] == [f"{root}/r/a", f"{root}/r/bb"]
    assert store.delete_prefix(f"{root}/r/b") == 0
    assert store.delete_prefix(f"{root}/never") == 0
    assert store.delete_prefix(f"{root}/r/a") == 0  # a key, not a directory
    assert store.get(f"{root}/r/a") == items[f"{root}/r/a"]
    assert store.delete_prefix(f"{root}/r/") == 2
    assert [i.key for i in store.list_prefix(root)] == [f"{root}/r2", f"{root}/rx/a"]
    # keys can be written again below a deleted directory
    assert store.create(f"{root}/r/b/c", "again").value == "again"


def test_ping(store):
    store.ping()


# -- watches ---------------------------------------------------------------

def test_watch_delivers_puts_and_deletes_in_order(store, root):
    events = []
    watch = store.watch_prefix(f"{root}/w", events.append)
    expected = []
    versions = []

    def step(action, *want):
        result = action()
        expected.extend(want)
        assert wait_for(lambda: len(events) >= len(expected)), (events, expected)
        assert triples(events) == expected
        if isinstance(result, Item):
            assert events[-1].version == result.version
        versions.extend(e.version for e in events[len(versions):])

    try:
        step(lambda: store.put(f"{root}/w/a", "1"), ("put", f"{root}/w/a", "1"))
        step(lambda: store.put(f"{root}/w/sub/x", "2"), ("put", f"{root}/w/sub/x", "2"))
        step(lambda: store.put(f"{root}/w/a", "3"), ("put", f"{root}/w/a", "3"))
        # outside the directory: no event (the next step shows the order)
        store.put(f"{root}/wx/a", "sibling")
        store.put(f"{root}/other", "elsewhere")
        step(lambda: store.create(f"{root}/w/sub/y", "4"), ("put", f"{root}/w/sub/y", "4"))
        item = store.get(f"{root}/w/a")
        step(lambda: store.compare_and_swap(f"{root}/w/a", "5", item.version),
             ("put", f"{root}/w/a", "5"))
        step(lambda: store.delete(f"{root}/w/a"), ("delete", f"{root}/w/a", None))
        step(lambda: store.delete_prefix(f"{root}/w/sub"),
             ("delete", f"{root}/w/sub/x", None), ("delete", f"{root}/w/sub/y", None))
        assert versions == sorted(versions)
        assert all(isinstance(e, Event) for e in events)
    finally:
        watch.stop()
    assert watch.stopped
    assert not watch.thread.is_alive()
    seen = len(events)
    store.put(f"{root}/w/after-stop", "x")
    time.sleep(0.3)
    assert len(events) == seen


def test_watch_since_a_version(store, root):
    a1 = store.put(f"{root}/s/a", "1")
    b = store.put(f"{root}/s/b", "2")
    store.put(f"{root}/elsewhere", "x")
    a2 = store.put(f"{root}/s/a", "3")
    events = []
    watch = store.watch_prefix(f"{root}/s", events.append, since=a1.version)
    try:
        assert wait_for(lambda: len(events) >= 2), events
        assert [(e.action, e.key, e.value, e.version) for e in events] == [
            ("put", f"{root}/s/b", "2", b.version), ("put", f"{root}/s/a", "3", a2.version)]
        c = store.put(f"{root}/s/c", "4")
        assert wait_for(lambda: len(events) >= 3), events
        assert events[2] == Event("put", f"{root}/s/c", "4", c.version)
    finally:
        store.close()  # close() stops the watches of the store
    assert watch.stopped
    assert not watch.thread.is_alive()


def test_watch_survives_a_failing_callback(store, root):
    events = []

    def callback(event):
        events.append(event)
        if len(events) == 1:
            raise RuntimeError("callback bug")

    watch = store.watch_prefix(root, callback)
    try:
        store.put(f"{root}/1", "a")
        assert wait_for(lambda: len(events) == 1)
        store.put(f"{root}/2", "b")
        assert wait_for(lambda: len(events) == 2), events
        assert triples(events) == [("put", f"{root}/1", "a"), ("put", f"{root}/2", "b")]
    finally:
        watch.stop()


# -- concurrency -----------------------------------------------------------

def _increment(store, key: str, times: int) -> int:
    """Add 1 to the counter at ``key`` ``times`` times; returns the retries."""
    retries = 0
    for _ in range(times):
        while True:
            item = store.get(key)
            try:
                store.compare_and_swap(key, str(int(item.value) + 1), item.version)
                break
            except CompareFailed:
                retries += 1
    return retries


def _in_threads(work, n: int = 4) -> None:
    """Run ``work()`` in ``n`` threads at once; re-raise the first failure."""
    errors = []

    def worker():
        try:
            work()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_concurrent_cas_from_threads_loses_no_update(store, root):
    key = f"{root}/counter"
    store.create(key, "0")
    _in_threads(lambda: _increment(store, key, 25))
    assert store.get(key).value == "100"


def test_update_creates_changes_keeps_and_deletes(store, root):
    key = f"{root}/upd"
    seen = []

    def put(value):
        def mutate(item):
            seen.append(item)
            return value
        return mutate

    created = store.update(key, put("a"))
    assert seen == [None] and created == store.get(key) and created.value == "a"
    changed = store.update(key, lambda item: item.value + "b")
    assert changed.value == "ab" and changed.version > created.version
    assert store.update(key, put("ab")) == changed          # same value: no write
    assert store.update(key, lambda item: KEEP) == changed
    assert store.get(key) == changed
    assert store.update(key, put(None)) is None
    with pytest.raises(KeyNotFound):
        store.get(key)
    assert store.update(key, put(None)) is None             # absent stays absent


def test_update_aborts_when_the_mutator_raises(store, root):
    key = f"{root}/upd-abort"
    before = store.put(key, "x")

    def refuse(item):
        raise ValueError("no")
    with pytest.raises(ValueError):
        store.update(key, refuse)
    assert store.get(key) == before


def test_update_from_threads_loses_no_update(store, root):
    key = f"{root}/upd-counter"

    def work():
        for _ in range(20):
            store.update(key, lambda item: str(int(item.value) + 1 if item else 1))
    _in_threads(work)
    assert store.get(key).value == "80"


def test_update_gives_up_after_its_retries(store, root):
    key = f"{root}/upd-race"
    store.put(key, "0")

    def racing(item):
        store.put(key, str(int(item.value) + 1))        # a writer always wins
        return "mine"
    with pytest.raises(TooMuchContention):
        store.update(key, racing, retries=3)
    assert store.get(key).value == "3"


def _process_worker(path: str, key: str, times: int) -> None:
    store = EmbeddedDatastore(path)
    try:
        _increment(store, key, times)
    finally:
        store.close()


def test_embedded_concurrent_cas_from_processes(tmp_path):
    path = str(tmp_path / "shared.db")
    store = EmbeddedDatastore(path)
    key = "/counter"
    store.create(key, "0")
    events = []
    watch = store.watch_prefix("/", events.append)
    try:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_process_worker, args=(path, key, 25)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        assert store.get(key).value == "100"
        # a watch in another process saw every increment, in order
        assert wait_for(lambda: len(events) >= 100), len(events)
        assert [e.value for e in events] == [str(n) for n in range(1, 101)]
    finally:
        watch.stop()
        store.close()


# -- embedded specifics ----------------------------------------------------

def test_embedded_watch_behind_pruned_change_log_relists(tmp_path, monkeypatch):
    from netplugin.datastore import embedded
    monkeypatch.setattr(embedded, "CHANGE_LOG_ROWS", 10)
    monkeypatch.setattr(embedded, "PRUNE_EVERY", 5)
    store = EmbeddedDatastore(str(tmp_path / "db"))
    try:
        first = store.put("/p/k00", "0")
        for n in range(1, 40):
            store.put(f"/p/k{n:02d}", str(n))
        store.put("/p/k05", "changed")
        events = []
        watch = store.watch_prefix("/p", events.append, since=first.version)
        try:
            assert wait_for(lambda: len(events) >= 39), len(events)
            keys = [e.key for e in events]
            assert sorted(keys) == [f"/p/k{n:02d}" for n in range(1, 40)]
            assert events[-1] == Event("put", "/p/k05", "changed", store.get("/p/k05").version)
            store.delete("/p/k01")
            assert wait_for(lambda: len(events) >= 40)
            assert triples(events[39:]) == [("delete", "/p/k01", None)]
        finally:
            watch.stop()
    finally:
        store.close()


def test_embedded_unusable_path_is_unavailable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(DatastoreUnavailable) as exc:
        EmbeddedDatastore(str(blocker / "state.db"))
    assert str(blocker) in str(exc.value)


# -- unreachable stores ----------------------------------------------------

def _remote(kind: str, address: str, timeout: float):
    if kind in ("etcd", "etcdv3"):
        return open_datastore(
            DatastoreConfig(type=kind, endpoints=[f"http://{address}"], timeout=timeout))
    return ConsulDatastore.from_config(
        DatastoreConfig(type="consul", address=address, timeout=timeout))


OPERATIONS = {
    "get": lambda ds: ds.get("/a"),
    "put": lambda ds: ds.put("/a", "1"),
    "create": lambda ds: ds.create("/a", "1"),
    "cas": lambda ds: ds.compare_and_swap("/a", "1", 5),
    "delete": lambda ds: ds.delete("/a"),
    "delete_version": lambda ds: ds.delete("/a", 5),
    "delete_prefix": lambda ds: ds.delete_prefix("/a"),
    "list_prefix": lambda ds: ds.list_prefix("/a"),
    "ping": lambda ds: ds.ping(),
}


def _assert_unavailable(ds, kind, address, reason, limit):
    for name, op in OPERATIONS.items():
        start = time.monotonic()
        with pytest.raises(DatastoreUnavailable) as exc:
            op(ds)
        elapsed = time.monotonic() - start
        message = str(exc.value)
        assert kind in message and address in message, (name, message)
        assert reason in message, (name, message)
        assert elapsed < limit, (name, elapsed)


@pytest.mark.parametrize("kind", ["etcd", "etcdv3", "consul"])
def test_unreachable_closed_port(kind):
    address = f"127.0.0.1:{free_port()}"
    ds = _remote(kind, address, timeout=1.0)
    _assert_unavailable(ds, kind, address, "is unreachable: connection refused", limit=1.5)
    # a watch does not fail: it keeps retrying in the background until stopped
    watch = ds.watch_prefix("/a", lambda event: None)
    start = time.monotonic()
    watch.stop()
    assert not watch.thread.is_alive()
    assert time.monotonic() - start < 3
    ds.close()


@pytest.mark.parametrize("kind", ["etcd", "etcdv3", "consul"])
def test_silent_server_times_out(kind):
    with silent_server() as address:
        ds = _remote(kind, address, timeout=0.3)
        start = time.monotonic()
        with pytest.raises(DatastoreUnavailable) as exc:
            ds.get("/a")
        assert time.monotonic() - start < 2
        assert address in str(exc.value) and "no answer within 0.3 s" in str(exc.value)
        with pytest.raises(DatastoreUnavailable):
            ds.put("/a", "1")
        ds.close()


@pytest.mark.parametrize("status", ["200 OK", "500 Internal Server Error"])
@pytest.mark.parametrize("kind", ["etcd", "etcdv3", "consul"])
def test_garbage_answer_is_unavailable(kind, status):
    with garbage_server(status) as address:
        ds = _remote(kind, address, timeout=1.0)
        _assert_unavailable(ds, kind, address, "", limit=1.5)
        ds.close()


def test_etcd_several_endpoints_skip_a_dead_one(etcd_endpoint):
    dead = f"http://127.0.0.1:{free_port()}"
    ds = EtcdDatastore([dead, etcd_endpoint], timeout=1.0)
    key = f"/test/{uuid.uuid4().hex[:12]}/k"
    try:
        item = ds.put(key, "v")
        assert ds.get(key) == item
        ds.delete(key)
    finally:
        ds.close()


@pytest.mark.parametrize("kind", ["etcd", "etcdv3"])
def test_etcd_watch_survives_a_restart(kind):
    with run_etcd() as server:
        ds = open_datastore(DatastoreConfig(type=kind, endpoints=[server.url], timeout=1.0))
        events = []
        watch = ds.watch_prefix("/r", events.append)
        try:
            ds.put("/r/a", "1")
            assert wait_for(lambda: len(events) == 1)
            server.stop()
            with pytest.raises(DatastoreUnavailable):
                ds.put("/r/lost", "x")
            time.sleep(0.3)  # the watch meets the outage
            server.start()
            ds.put("/r/b", "2")
            assert wait_for(lambda: len(events) == 2, timeout=10), events
            assert triples(events) == [("put", "/r/a", "1"), ("put", "/r/b", "2")]
        finally:
            watch.stop()
            ds.close()


# -- counting wrapper ------------------------------------------------------

def test_counting_datastore_counts_per_thread(tmp_path):
    inner = EmbeddedDatastore(str(tmp_path / "db"))
    ds = CountingDatastore(inner)
    assert ds.name == "embedded"
    ds.reset()
    item = ds.put("/c/a", "1")                       # W
    ds.get("/c/a")                                   # R
    ds.list_prefix("/c")                             # R
    ds.create("/c/b", "2")                           # W
    ds.compare_and_swap("/c/a", "3", item.version)   # W
    ds.delete("/c/b")                                # D
    with pytest.raises(KeyNotFound):
        ds.get("/c/missing")                         # R (failed calls count too)
    ds.delete_prefix("/c")                           # D
    assert ds.counts == {"R": 3, "W": 3, "D": 2}
    assert ds.summary() == "3R 3W 2D"
    assert [entry[:2] for entry in ds.log][:3] == [("W", "put"), ("R", "get"), ("R", "list_prefix")]

    other = {}

    def in_another_thread():
        ds.reset()
        ds.put("/c/t", "x")
        ds.get("/c/t")
        other["counts"] = ds.counts
        other["log"] = ds.log

    t = threading.Thread(target=in_another_thread)
    t.start()
    t.join(10)
    assert other["counts"] == {"R": 1, "W": 1, "D": 0}
    assert other["log"] == [("W", "put", "/c/t"), ("R", "get", "/c/t")]
    assert ds.counts == {"R": 3, "W": 3, "D": 2}  # this thread's counts are untouched
    ds.reset()
    assert ds.counts == {"R": 0, "W": 0, "D": 0} and ds.log == []
    ds.close()
