"""etcdv3 specifics (and the v2 ``etcd`` type's, where they are shared) on real etcd servers: TLS (certificates made with openssl
here), the CA of ``ca_file`` winning over REQUESTS_CA_BUNDLE/SSL_CERT_FILE,
etcd auth, a 3-member cluster losing its leader, answers lost after a write
was sent, watches across restarts and compactions.  (The common contract is
in test_datastore_contract.py.)"""
from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
import urllib.request
import uuid

import pytest

from netplugin.config import DatastoreConfig
from netplugin.datastore import (
    CompareFailed, DatastoreMisconfigured, DatastoreUnavailable, KeyExists, open_datastore)
from netplugin.datastore import etcd as etcdv2
from netplugin.datastore import etcdv3
from tests.datastore_servers import (  # noqa: F401  (fixtures used by name)
    TlsFiles, etcd_endpoint, run_etcd, run_etcd_cluster)
from tests.waiting import wait_for


def triples(events):
    return [(e.action, e.key, e.value) for e in events]


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return TlsFiles(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def tls_etcd(tls):
    with run_etcd(tls=tls) as server:
        yield server


def _open(url, kind="etcdv3", **kw):
    return open_datastore(DatastoreConfig(type=kind, endpoints=[url], timeout=2.0, **kw))


# -- TLS -----------------------------------------------------------------

def test_tls_with_client_certificate(tls, tls_etcd):
    ds = _open(tls_etcd.url, ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key)
    try:
        key = f"/test/{uuid.uuid4().hex[:8]}/k"
        item = ds.put(key, "v")
        assert ds.get(key) == item
        ds.ping()
    finally:
        ds.close()


def test_v2_tls_with_client_certificate_and_wrong_ca(tls, tls_etcd, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls.other_ca)
    monkeypatch.setenv("SSL_CERT_FILE", tls.other_ca)
    ds = _open(tls_etcd.url, "etcd", ca_file=tls.ca, cert_file=tls.client_cert,
               key_file=tls.client_key)
    try:
        item = ds.put("/test/v2tls", "v")
        assert ds.get("/test/v2tls") == item
    finally:
        ds.close()
    ds = _open(tls_etcd.url, "etcd", ca_file=tls.other_ca, cert_file=tls.client_cert,
               key_file=tls.client_key)
    with pytest.raises(DatastoreMisconfigured) as exc:
        ds.ping()
    assert str(exc.value) == f"etcd at {tls_etcd.url}: TLS failed: certificate verify failed"
    ds.close()


def test_ca_file_wins_over_the_environment(tls, tls_etcd, monkeypatch):
    """The machine may point REQUESTS_CA_BUNDLE and SSL_CERT_FILE at another
    bundle: ca_file is still the CA used, both ways."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls.other_ca)
    monkeypatch.setenv("SSL_CERT_FILE", tls.other_ca)
    monkeypatch.setenv("CURL_CA_BUNDLE", tls.other_ca)
    ds = _open(tls_etcd.url, ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key)
    try:
        ds.ping()
    finally:
        ds.close()
    # and the environment's (right) CA does not rescue a wrong ca_file
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls.ca)
    monkeypatch.setenv("SSL_CERT_FILE", tls.ca)
    monkeypatch.setenv("CURL_CA_BUNDLE", tls.ca)
    ds = _open(tls_etcd.url, ca_file=tls.other_ca, cert_file=tls.client_cert,
               key_file=tls.client_key)
    try:
        with pytest.raises(DatastoreMisconfigured) as exc:
            ds.ping()
        assert "certificate verify failed" in str(exc.value)
    finally:
        ds.close()


def test_wrong_ca_is_misconfigured_one_line(tls, tls_etcd):
    ds = _open(tls_etcd.url, ca_file=tls.other_ca, cert_file=tls.client_cert,
               key_file=tls.client_key)
    start = time.monotonic()
    with pytest.raises(DatastoreMisconfigured) as exc:
        ds.get("/a")
    assert time.monotonic() - start < 1.5  # not retried until the timeout
    message = str(exc.value)
    assert message.startswith(f"etcdv3 at {tls_etcd.url}: TLS failed: certificate verify failed")
    assert "\n" not in message
    ds.close()


def test_client_certificate_of_another_ca_is_refused(tls, tls_etcd):
    ds = _open(tls_etcd.url, ca_file=tls.ca, cert_file=tls.other_client_cert,
               key_file=tls.other_client_key)
    with pytest.raises(DatastoreMisconfigured) as exc:
        ds.ping()
    assert tls_etcd.url in str(exc.value) and "TLS failed" in str(exc.value)
    ds.close()


def test_unreadable_certificate_file_fails_at_construction(tls, tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(DatastoreMisconfigured) as exc:
        _open("https://127.0.0.1:1", ca_file=missing)
    assert str(exc.value) == (f"etcdv3 at https://127.0.0.1:1: cannot read ca_file {missing}: "
                              "No such file or directory")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(DatastoreMisconfigured) as exc:
        _open("https://127.0.0.1:1", ca_file=tls.ca, cert_file=str(garbage),
              key_file=tls.client_key)
    assert "bad certificate files" in str(exc.value)


# -- auth ----------------------------------------------------------------

def _gateway(url, path, payload, token=None):
    req = urllib.request.Request(url + "/v3/" + path, data=json.dumps(payload).encode(),
                                 headers={"Authorization": token} if token else {})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def test_auth_good_and_bad_credentials():
    with run_etcd() as server:
        _gateway(server.url, "auth/user/add", {"name": "root", "password": "rootpw"})
        _gateway(server.url, "auth/role/add", {"name": "root"})
        _gateway(server.url, "auth/user/grant", {"user": "root", "role": "root"})
        _gateway(server.url, "auth/enable", {})
        good = _open(server.url, username="root", password="rootpw")
        try:
            item = good.put("/calico/v1/x", "1")
            assert good.get("/calico/v1/x") == item
            good._token = "expired-or-garbage"        # etcd says: invalid token
            assert good.get("/calico/v1/x") == item   # a new one, transparently
        finally:
            good.close()
        bad = _open(server.url, username="root", password="wrong")
        with pytest.raises(DatastoreMisconfigured) as exc:
            bad.ping()
        assert server.url in str(exc.value) and "auth" in str(exc.value)
        bad.close()
        anonymous = _open(server.url)
        with pytest.raises(DatastoreMisconfigured):
            anonymous.ping()
        anonymous.close()


# -- lost answers: re-read and decide, never re-send blindly ---------------

class _LoseAnswers:
    """Let the next ``count`` writes reach etcd, then lose their answers."""

    def __init__(self, ds, count=1):
        self.ds, self.count = ds, count
        self.real = ds._post_once
        self.sent = []

    def __call__(self, index, path, payload, read_timeout, connect_timeout):
        answer = self.real(index, path, payload, read_timeout, connect_timeout)
        if path != "kv/range" and self.count > 0:
            self.count -= 1
            self.sent.append(path)
            raise etcdv3._Failed("connection lost", sent=True)
        return answer


@pytest.fixture
def v3(etcd_endpoint):
    ds = _open(etcd_endpoint)
    root = f"/test/{uuid.uuid4().hex[:12]}"
    yield ds, root
    ds.delete_prefix(root)
    ds.close()


def test_lost_answer_of_a_cas_that_landed(v3, monkeypatch):
    ds, root = v3
    key = f"{root}/counter"
    item = ds.create(key, "0")
    lose = _LoseAnswers(ds)
    monkeypatch.setattr(ds, "_post_once", lose)
    new = ds.compare_and_swap(key, "1", item.version)   # landed; answer lost
    assert lose.sent == ["kv/txn"]
    assert ds.get(key) == new and new.value == "1"
    lose.count = 1
    created = ds.create(f"{root}/c", "x")               # landed; answer lost: ours
    assert ds.get(f"{root}/c") == created
    with pytest.raises(KeyExists):                      # and only once
        ds.create(f"{root}/c", "y")


def test_lost_answer_of_a_cas_that_landed_and_was_overwritten(v3):
    """Ours landed, its answer was lost, another writer changed the key before
    the re-read: the history says the first change was ours: success (a
    CompareFailed would make the caller apply its change a second time)."""
    ds, root = v3
    key = f"{root}/k"
    item = ds.put(key, "a")
    real = ds._post_once

    def land_race_lose(index, path, payload, rt, ct):
        if path == "kv/txn":
            ds._post_once = real
            real(index, path, payload, rt, ct)          # ours lands
            other = _open(ds._uris[0])
            other.put(key, "other")                     # then someone else's
            other.close()
            raise etcdv3._Failed("connection lost", sent=True)
        return real(index, path, payload, rt, ct)

    ds._post_once = land_race_lose
    new = ds.compare_and_swap(key, "mine", item.version)
    assert new.value == "mine" and new.version > item.version
    assert ds.get(key).value == "other"
    ds._post_once = land_race_lose
    created = ds.create(f"{root}/c", "mine")            # the same for a create
    assert created.value == "mine"


@pytest.mark.parametrize("ours_first", [True, False])
def test_lost_answer_decided_after_hundreds_of_later_writes(v3, ours_first):
    """The answer is lost and the key (and others) change hundreds of times
    before the re-read, as under a busy counter when the leader dies: the
    history still decides, exactly, whose write came first (ours: success;
    another's: CompareFailed, and ours is not applied on top)."""
    ds, root = v3
    key = f"{root}/k"
    item = ds.put(key, "a")
    real = ds._post_once

    def race(index, path, payload, rt, ct):
        if path == "kv/txn":
            ds._post_once = real
            other = _open(ds._uris[0])
            if ours_first:
                real(index, path, payload, rt, ct)      # ours lands first
            for i in range(300):
                other.put(key, f"other-{i}")
                other.put(f"{root}/noise", str(i))
            if not ours_first:
                real(index, path, payload, rt, ct)      # too late: compare fails
            other.delete(key)
            other.put(key, "again")
            other.close()
            raise etcdv3._Failed("connection lost", sent=True)
        return real(index, path, payload, rt, ct)

    ds._post_once = race
    if ours_first:
        new = ds.compare_and_swap(key, "mine", item.version)
        assert new.value == "mine" and new.version == item.version + 1
    else:
        with pytest.raises(CompareFailed):
            ds.compare_and_swap(key, "mine", item.version)
    assert ds.get(key).value == "again"


def test_lost_answer_of_a_cas_that_did_not_land_is_sent_once_more(v3):
    ds, root = v3
    key = f"{root}/k"
    item = ds.put(key, "a")
    real = ds._post_once
    calls = []

    def lose_before(index, path, payload, rt, ct):
        calls.append(path)
        if path == "kv/txn" and calls.count("kv/txn") == 1:
            raise etcdv3._Failed("no answer in time", sent=True)   # never reached etcd
        return real(index, path, payload, rt, ct)

    ds._post_once = lose_before
    new = ds.compare_and_swap(key, "b", item.version)
    assert new.value == "b" and calls == ["kv/txn", "kv/range", "kv/txn"]
    assert ds.get(key) == new


def test_v2_lost_answers_are_decided_not_resent(etcd_endpoint):
    """The v2 type: a CAS/create whose answer was lost is read back (it
    landed: success, once); one that did not land is sent once more."""
    ds = _open(etcd_endpoint, "etcd")
    root = f"/test/{uuid.uuid4().hex[:12]}"
    real = ds._call
    plan = []

    def call(op, idempotent):
        if idempotent or not plan:
            return real(op, idempotent)
        what = plan.pop(0)
        if what in ("apply-then-lose", "apply-race-lose", "apply-delete-lose"):
            real(op, idempotent)
        if what == "apply-race-lose":
            real(lambda c: c.write(f"{root}/k", "other"), False)
        if what == "apply-delete-lose":
            real(lambda c: c.delete(f"{root}/k"), False)
        raise etcdv2._Lost("test: answer lost")

    ds._call = call
    try:
        item = ds.create(f"{root}/k", "0")
        plan[:] = ["apply-then-lose"]
        new = ds.compare_and_swap(f"{root}/k", "1", item.version)
        assert new == ds.get(f"{root}/k") and new.value == "1"
        plan[:] = ["lose"]
        newer = ds.compare_and_swap(f"{root}/k", "2", new.version)
        assert newer == ds.get(f"{root}/k") and newer.value == "2"
        plan[:] = ["apply-race-lose"]      # landed, overwritten, answer lost: ours
        raced = ds.compare_and_swap(f"{root}/k", "3", newer.version)
        assert raced.value == "3" and ds.get(f"{root}/k").value == "other"
        newer = ds.put(f"{root}/k", "2")
        plan[:] = ["apply-delete-lose"]    # landed, then deleted, answer lost: ours
        assert ds.compare_and_swap(f"{root}/k", "4", newer.version).value == "4"
        newer = ds.create(f"{root}/k", "2")
        plan[:] = ["apply-then-lose"]
        ds.create(f"{root}/c", "x")
        with pytest.raises(KeyExists):
            ds.create(f"{root}/c", "y")
        plan[:] = ["apply-then-lose"]
        ds.delete(f"{root}/c")
        assert ds.list_prefix(root) == [newer]
    finally:
        ds._call = real
        ds.delete_prefix(root)
        ds.close()


# -- a 3-member cluster ------------------------------------------------------

def _leader_index(cluster):
    statuses = []
    for m in cluster.members:
        try:
            statuses.append(_gateway(m.url, "maintenance/status", {}))
        except OSError:
            statuses.append(None)
    for i, st in enumerate(statuses):
        if st and st["header"]["member_id"] == st["leader"]:
            return i
    return None


@pytest.mark.parametrize("kind", ["etcdv3", "etcd"])
def test_cluster_leader_killed_during_concurrent_cas(kind):
    """kill -9 the leader (first endpoint) while 8 threads increment one
    counter with CAS: no call fails, no increment is lost or doubled.  Each
    write names its writer (as Calico's records name their handle): a lost
    answer is decided by reading the value back."""
    with run_etcd_cluster(3) as cluster:
        assert wait_for(lambda: _leader_index(cluster) is not None, 10)
        leader = _leader_index(cluster)
        urls = [cluster.urls[leader]] + [u for i, u in enumerate(cluster.urls) if i != leader]
        ds = open_datastore(DatastoreConfig(type=kind, endpoints=urls, timeout=5.0))
        key = "/calico/counter"
        ds.create(key, json.dumps({"n": 0}))
        done, errors = [], []

        def worker():
            for _ in range(30):
                while True:
                    try:
                        item = ds.get(key)
                        value = {"n": json.loads(item.value)["n"] + 1, "by": uuid.uuid4().hex}
                        ds.compare_and_swap(key, json.dumps(value), item.version)
                        done.append(1)
                        break
                    except CompareFailed:
                        continue
                    except Exception as e:
                        errors.append(repr(e))
                        return

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        os.kill(cluster.members[leader].proc.pid, signal.SIGKILL)
        for t in threads:
            t.join(120)
        assert errors == []
        assert len(done) == 240
        assert json.loads(ds.get(key).value)["n"] == 240
        # the killed member rejoins
        cluster.members[leader].start()
        assert wait_for(lambda: _leader_index(cluster) is not None, 10)
        ds.close()


@pytest.mark.parametrize("kind", ["etcdv3", "etcd"])
def test_cluster_first_endpoint_down_moves_on_quickly(kind):
    with run_etcd_cluster(3) as cluster:
        cluster.members[0].stop()
        ds = open_datastore(DatastoreConfig(type=kind, endpoints=cluster.urls, timeout=3.0))
        try:
            start = time.monotonic()
            item = ds.put("/calico/a", "1")
            assert ds.get("/calico/a") == item
            assert time.monotonic() - start < 3.0
            for m in cluster.members[1:]:
                m.stop()
            with pytest.raises(DatastoreUnavailable) as exc:
                ds.get("/calico/a")
            message = str(exc.value)
            assert message.startswith(f"{kind} at {', '.join(cluster.urls)} is unreachable: ")
            assert "connection refused" in message
        finally:
            ds.close()


# -- watches -------------------------------------------------------------

def test_watch_after_compaction_resyncs(v3):
    """Watching from a revision etcd compacted away: a full re-read, the
    difference delivered (no silent gap), then live events again."""
    ds, root = v3
    first = ds.put(f"{root}/a", "1")
    ds.put(f"{root}/b", "2")
    ds.put(f"{root}/a", "3")
    ds.put(f"{root}/c", "4")
    ds.delete(f"{root}/c")
    ds.compact()
    events = []
    watch = ds.watch_prefix(root, events.append, since=first.version)
    try:
        assert wait_for(lambda: len(events) >= 2), events
        assert sorted(triples(events)) == [("put", f"{root}/a", "3"), ("put", f"{root}/b", "2")]
        ds.put(f"{root}/d", "5")
        assert wait_for(lambda: len(events) >= 3), events
        assert triples(events[2:]) == [("put", f"{root}/d", "5")]
    finally:
        watch.stop()


def test_watch_that_falls_behind_a_compaction_while_running(v3, monkeypatch):
    """A watch whose stream is down while keys change and history is
    compacted: it resyncs, deletes included."""
    ds, root = v3
    ds.put(f"{root}/keep", "1")
    ds.put(f"{root}/gone", "1")
    events = []
    watch = ds.watch_prefix(root, events.append)
    try:
        real = ds._watch_stream
        pause = threading.Event()

        def maybe_down(*args):
            if pause.is_set():
                time.sleep(0.05)
                raise etcdv3._Failed("test: stream down", sent=False)
            return real(*args)

        monkeypatch.setattr(ds, "_watch_stream", maybe_down)
        pause.set()
        time.sleep(etcdv3.WATCH_POLL + 0.5)   # the open stream ends; the next fails
        ds.delete(f"{root}/gone")
        ds.put(f"{root}/keep", "2")
        ds.put(f"{root}/new", "3")
        ds.compact()
        pause.clear()
        assert wait_for(lambda: len(events) >= 3, 10), events
        assert sorted(triples(events)) == sorted([
            ("delete", f"{root}/gone", None), ("put", f"{root}/keep", "2"),
            ("put", f"{root}/new", "3")])
    finally:
        watch.stop()


def test_keys_are_utf8_like_v2(v3):
    ds, root = v3
    key = f"{root}/ünïcødé/网络"
    ds.put(key, "v")
    raw = _gateway(ds._uris[0], "kv/range", {"key": base64.b64encode(key.encode()).decode()})
    assert base64.b64decode(raw["kvs"][0]["key"]).decode() == key
    assert [i.key for i in ds.list_prefix(f"{root}/ünïcødé")] == [key]


# -- the plugin refuses to start on what waiting cannot heal -------------------

def _plugin_config(tmp_path, url, **datastore):
    extra = "".join(f'{k} = "{v}"\n' for k, v in datastore.items())
    path = tmp_path / "plugin.cfg"
    path.write_text(f'socket = "{tmp_path}/calico.sock"\nstate_dir = "{tmp_path}/run"\n'
                    f'[datastore]\ntype = "etcdv3"\nendpoints = ["{url}"]\ntimeout = 2.0\n'
                    f'{extra}[calico]\nhostname = "h1"\n')
    return str(path)


def test_plugin_refuses_to_start_with_a_wrong_ca(tls, tls_etcd, tmp_path, capsys, monkeypatch):
    from netplugin import cli
    monkeypatch.setattr(cli, "prepare_state", lambda cfg: None)  # no metrics dir in pytest
    path = _plugin_config(tmp_path, tls_etcd.url, ca_file=tls.other_ca,
                          cert_file=tls.client_cert, key_file=tls.client_key)
    assert cli.main(["-f", path]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"netplugin: error: etcdv3 at {tls_etcd.url}: TLS failed: "
                   "certificate verify failed"]


def test_plugin_refuses_to_start_with_a_missing_cert_file(tmp_path, capsys, monkeypatch):
    from netplugin import cli
    monkeypatch.setattr(cli, "prepare_state", lambda cfg: None)  # no metrics dir in pytest
    missing = str(tmp_path / "client.pem")
    path = _plugin_config(tmp_path, "https://127.0.0.1:2379", cert_file=missing,
                          key_file=missing)
    assert cli.main(["-f", path]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"netplugin: error: etcdv3 at https://127.0.0.1:2379: cannot read "
                   f"cert_file {missing}: No such file or directory"]


def test_plugin_refuses_to_start_with_bad_credentials(tmp_path, capsys, monkeypatch):
    from netplugin import cli
    monkeypatch.setattr(cli, "prepare_state", lambda cfg: None)  # no metrics dir in pytest
    with run_etcd() as server:
        _gateway(server.url, "auth/user/add", {"name": "root", "password": "rootpw"})
        _gateway(server.url, "auth/role/add", {"name": "root"})
        _gateway(server.url, "auth/user/grant", {"user": "root", "role": "root"})
        _gateway(server.url, "auth/enable", {})
        path = _plugin_config(tmp_path, server.url, username="root", password="nope")
        assert cli.main(["-f", path]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"netplugin: error: etcdv3 at {server.url}: "
                                                   "etcd auth as 'root' failed: "), err
