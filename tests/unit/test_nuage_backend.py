"""NuageBackend call by call, in-process: a real embedded datastore, and
recording fakes for VRS (OVSDB), Docker and Linux (no netlink here: the
in-process tests must not touch the machine's network namespace).  The real
OVSDB side is in test_nuage_vrs.py, everything together in the e2e tests."""
import base64
import json
import time

import pytest

import backends.nuage.driver  # noqa: F401  (registers "nuage")
from backends.nuage import keys
from backends.nuage.docker_api import Container, DockerUnavailable
from backends.nuage.driver import NuageBackend
from backends.nuage.vport import Resolution
from backends.nuage.vrs import ResolveTimeout, VrsError, VrsUnavailable
from netplugin import protocol as p
from netplugin.backend import load_backend
from netplugin.config import config_from_text
from netplugin.datastore import CountingDatastore
from netplugin.datastore.embedded import EmbeddedDatastore
from netplugin.errors import InvalidRequest, NotFound, NotSupported, PluginError

NID = "3df319d886f3a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f607182930"
EID = "27d4e97367f0aabbccddeeff00112233445566778899aabbccddeeff00112233"
EID2 = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b"
PORT, PEER = "nuv27d4e97367f0", "nut27d4e97367f0"
CID = "c0ffee" + "0" * 58
OPTS = {"organization": "Enterprise", "domain": "Domain", "zone": "Zone",
        "subnet": "Subnet 2", "user": "admin"}


class FakeVrs:
    """Records what the backend asks of VRS; resolves like VRS would."""

    remote = "unix:/fake/db.sock"
    timeout = 1.0

    def __init__(self):
        self.ready = True
        self.bridge_ok = True
        self.vports = {}
        self.calls = []
        self.fail = {}
        self.resolution = "auto"   # "auto": the static IP; None: never; or a Resolution

    def _check(self, op):
        if not self.ready:
            raise VrsUnavailable(f"VRS OVSDB at {self.remote} is not reachable")
        if op in self.fail:
            raise self.fail[op]

    def wait_ready(self, timeout=None):
        self._check("wait_ready")

    def bridge_exists(self):
        return self.bridge_ok

    def ensure_vport(self, vp, fresh, timeout=None):
        self.calls.append(("ensure", vp.name, fresh))
        self._check("ensure")
        self.vports[vp.name] = vp

    def wait_resolved(self, name, timeout):
        self.calls.append(("wait", name))
        if self.resolution is None:
            raise ResolveTimeout(f"VRS did not resolve vPort {name} within {timeout:g}s")
        if self.resolution == "auto":
            return Resolution(self.vports[name].ip, "255.255.255.0", "10.21.59.1", 1, 2)
        return self.resolution

    def remove_vport(self, name, timeout=None):
        self.calls.append(("remove", name))
        self._check("remove")
        return self.vports.pop(name, None) is not None

    def snapshot_ports(self):
        return {n: {"endpoint": vp.endpoint_id, "driver": vp.driver, "bridge": "alubr0"}
                for n, vp in self.vports.items()}

    def stop(self):
        pass


class FakeDocker:
    def __init__(self):
        self.containers = {}     # eid -> Container
        self.down = False

    def container_for_endpoint(self, nid, eid):
        if self.down:
            raise DockerUnavailable("cannot reach Docker at unix:///fake: timed out")
        return self.containers.get(eid)

    def endpoint_ids(self, driver):
        if self.down:
            raise DockerUnavailable("cannot reach Docker at unix:///fake: timed out")
        return set(self.containers)

    def close(self):
        pass


class FakeLinux:
    def __init__(self):
        self.links = set()
        self.calls = []

    def create_veth(self, name, peer, mtu=None, peer_mac=None):
        self.calls.append(("create_veth", name, peer, peer_mac))
        self.links |= {name, peer}

    def set_link_up(self, name):
        self.calls.append(("up", name))

    def delete_link(self, name):
        self.calls.append(("delete", name))
        gone = name in self.links
        self.links -= {name, "nut" + name[3:]}
        return gone

    def link_exists(self, name):
        return name in self.links


@pytest.fixture
def parts(tmp_path):
    cfg = config_from_text(f'backend = "nuage"\nstate_dir = "{tmp_path}/run"\n'
                           '[nuage]\nhostname = "h1"\n'
                           'resolve_timeout = 1.5\naudit_grace = 0\n')
    store = CountingDatastore(EmbeddedDatastore(str(tmp_path / "state.db")))
    vrs, dock, lin = FakeVrs(), FakeDocker(), FakeLinux()
    backend = NuageBackend(cfg, store, vrs=vrs, docker=dock, linux=lin)
    return backend, store, vrs, dock, lin


def net_req(nid=NID, opts=OPTS, pool="10.21.59.0/24"):
    return p.CreateNetworkRequest.parse({
        "NetworkID": nid, "Options": {"com.docker.network.generic": dict(opts)},
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": pool,
                      "Gateway": "10.21.59.1/24"}], "IPv6Data": []})


def ep_req(eid=EID, address="10.21.59.5/24", mac="", address6="", options=None, nid=NID):
    return p.CreateEndpointRequest.parse({
        "NetworkID": nid, "EndpointID": eid, "Options": options or {},
        "Interface": {"Address": address, "AddressIPv6": address6, "MacAddress": mac}})


def join_req(eid=EID, nid=NID):
    return p.JoinRequest.parse({"NetworkID": nid, "EndpointID": eid,
                                "SandboxKey": "/var/run/docker/netns/0123456789ab"})


def req(eid=EID, nid=NID):
    return p.EndpointRequest.parse({"NetworkID": nid, "EndpointID": eid})


def record(store, eid=EID):
    return json.loads(store.get(keys.endpoint("h1", eid)).value)


def joined(backend, dock, eid=EID, address="10.21.59.5/24"):
    dock.containers[eid] = Container(CID, "web")
    backend.create_network(net_req())
    backend.create_endpoint(ep_req(eid, address))
    return backend.join(join_req(eid))


def test_registered_as_nuage():
    assert load_backend("nuage") is NuageBackend
    assert NuageBackend.implements_ipam is False


def test_create_network_stores_it(parts):
    backend, store, *_ = parts
    store.reset()
    backend.create_network(net_req())
    assert store.counts == {"R": 0, "W": 1, "D": 0}
    net = json.loads(store.get(keys.network(NID)).value)
    assert {k: net[k] for k in OPTS} == OPTS
    assert (net["pool"], net["gateway"]) == ("10.21.59.0/24", "10.21.59.1")


def test_bad_network_options_write_nothing(parts):
    backend, store, *_ = parts
    with pytest.raises(InvalidRequest, match="missing nuage network option user"):
        backend.create_network(net_req(opts={k: v for k, v in OPTS.items() if k != "user"}))
    with pytest.raises(InvalidRequest, match="empty nuage network option zone"):
        backend.create_network(net_req(opts=dict(OPTS, zone="")))
    assert store.list_prefix(keys.ROOT) == []


def test_delete_network_is_idempotent(parts):
    backend, store, *_ = parts
    backend.create_network(net_req())
    backend.delete_network(p.NetworkRequest(NID))
    backend.delete_network(p.NetworkRequest(NID))
    assert store.list_prefix(keys.ROOT) == []


def test_create_endpoint(parts):
    backend, store, *_ = parts
    backend.create_network(net_req())
    store.reset()
    resp = backend.create_endpoint(ep_req())
    assert store.counts == {"R": 1, "W": 1, "D": 0}
    rec = record(store)
    assert resp.to_json() == {"Interface": {"MacAddress": rec["mac"]}}
    assert rec["mac"].startswith("7a:42:") and rec["address"] == "10.21.59.5/24"
    assert rec["joined"] is False and rec["vport"] is False
    # Docker's MAC (field or base64 option) is used and never echoed back
    assert backend.create_endpoint(ep_req(EID2, mac="02:42:0a:15:3b:07")).to_json() == {}
    assert record(store, EID2)["mac"] == "02:42:0a:15:3b:07"
    opt = {"com.docker.network.endpoint.macaddress":
           base64.b64encode(bytes.fromhex("02420a153b08")).decode()}
    assert backend.create_endpoint(ep_req(EID2, options=opt)).to_json() == {}
    assert record(store, EID2)["mac"] == "02:42:0a:15:3b:08"


@pytest.mark.parametrize("kw, err, words", [
    ({"nid": "f" * 64}, NotFound, "not known to the nuage plugin"),
    ({"address": ""}, InvalidRequest, "no Interface.Address"),
    ({"address6": "fd00::5/64"}, NotSupported, "IPv4 only"),
    ({"address": "10.99.0.5/24"}, InvalidRequest, "outside the network's subnet"),
])
def test_create_endpoint_refusals(parts, kw, err, words):
    backend, store, *_ = parts
    backend.create_network(net_req())
    with pytest.raises(err, match=words):
        backend.create_endpoint(ep_req(**kw))
    assert store.list_prefix(keys.endpoint_dir("h1")) == []


def test_join_plugs_the_vport_and_answers_vrs_gateway(parts):
    backend, store, vrs, dock, lin = parts
    dock.containers[EID] = Container(CID, "web")
    backend.create_network(net_req())
    backend.create_endpoint(ep_req())
    mac = record(store)["mac"]
    store.reset()
    resp = backend.join(join_req())
    assert store.counts == {"R": 2, "W": 1, "D": 0}
    assert resp.to_json() == {"InterfaceName": {"SrcName": PEER, "DstPrefix": "eth"},
                              "Gateway": "10.21.59.1", "DisableGatewayService": False}
    assert lin.calls == [("create_veth", PORT, PEER, mac), ("up", PORT)]
    assert vrs.calls == [("ensure", PORT, True), ("wait", PORT)]
    vp = vrs.vports[PORT]
    assert (vp.vm_uuid, vp.vm_name, vp.ip, vp.mac, vp.bridge) == \
        (CID, "web", "10.21.59.5", mac, "alubr0")
    assert vp.network.subnet == "Subnet 2"
    rec = record(store)
    assert (rec["joined"], rec["vport"], rec["vm_uuid"], rec["vm_name"], rec["identity"]) == \
        (True, True, CID, "web", "docker")


def test_join_falls_back_to_the_endpoint_when_docker_does_not_answer(parts):
    backend, store, vrs, dock, lin = parts
    dock.down = True
    backend.create_network(net_req())
    backend.create_endpoint(ep_req())
    backend.join(join_req())
    vp = vrs.vports[PORT]
    assert (vp.vm_uuid, vp.vm_name) == (EID, EID[:12])
    assert record(store)["identity"] == "endpoint"


def _assert_nothing_left(store, vrs, lin, eid=EID):
    assert vrs.vports == {}
    assert lin.links == set()
    rec = record(store, eid)
    assert rec["joined"] is False and rec["vport"] is False


def test_join_resolution_timeout_undoes_everything(parts):
    backend, store, vrs, dock, lin = parts
    vrs.resolution = None
    with pytest.raises(ResolveTimeout, match="did not resolve vPort nuv27d4e97367f0"):
        joined(backend, dock)
    assert ("remove", PORT) in vrs.calls and ("delete", PORT) in lin.calls
    _assert_nothing_left(store, vrs, lin)


def test_join_with_vrs_down_touches_nothing(parts):
    backend, store, vrs, dock, lin = parts
    vrs.ready = False
    with pytest.raises(VrsUnavailable, match="not reachable"):
        joined(backend, dock)
    assert lin.calls == [] and vrs.calls == []
    assert record(store)["joined"] is False
    # Docker then calls DeleteEndpoint: nothing in OVSDB to remove, no error
    backend.delete_endpoint(req())
    assert vrs.calls == []
    assert store.list_prefix(keys.endpoint_dir("h1")) == []


def test_join_without_bridge_is_a_clear_error(parts):
    backend, store, vrs, dock, lin = parts
    vrs.bridge_ok = False
    with pytest.raises(VrsError, match="bridge alubr0 does not exist"):
        joined(backend, dock)
    assert lin.calls == []


def test_join_rolls_back_when_the_ovsdb_write_fails(parts):
    backend, store, vrs, dock, lin = parts
    vrs.fail["ensure"] = VrsError("write vPort: constraint violation")
    with pytest.raises(VrsError, match="constraint violation"):
        joined(backend, dock)
    _assert_nothing_left(store, vrs, lin)


def test_join_refuses_a_resolution_that_disagrees_with_docker(parts):
    backend, store, vrs, dock, lin = parts
    vrs.resolution = Resolution("10.21.59.77", "255.255.255.0", "10.21.59.1")
    with pytest.raises(PluginError, match=r"to 10\.21\.59\.77/24, but Docker's IPAM"):
        joined(backend, dock)
    _assert_nothing_left(store, vrs, lin)


def test_join_unknown_endpoint(parts):
    backend, store, vrs, dock, lin = parts
    backend.create_network(net_req())
    with pytest.raises(NotFound, match=f"endpoint {EID} is not known"):
        backend.join(join_req())
    assert lin.calls == [] and vrs.calls == []


def test_leave_and_delete_endpoint_clean_up_idempotently(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    store.reset()
    backend.leave(req())
    assert store.counts == {"R": 1, "W": 1, "D": 0}
    assert vrs.vports == {} and lin.links == set()
    backend.leave(req())                       # again: fine
    store.reset()
    backend.delete_endpoint(req())
    assert store.counts == {"R": 1, "W": 0, "D": 1}
    backend.delete_endpoint(req())             # again: fine
    assert store.list_prefix(keys.endpoint_dir("h1")) == []


def test_delete_endpoint_alone_cleans_everything(parts):
    """A failed Join gets DeleteEndpoint without Leave; so does a crash."""
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    backend.delete_endpoint(req())
    assert vrs.vports == {} and lin.links == set()
    assert store.list_prefix(keys.endpoint_dir("h1")) == []


def test_delete_endpoint_with_vrs_down_reports_and_forgets(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    vrs.ready = False
    with pytest.raises(PluginError, match="removed when VRS is reachable again"):
        backend.delete_endpoint(req())
    assert lin.links == set()                  # the veth is gone anyway
    assert store.list_prefix(keys.endpoint_dir("h1")) == []
    # VRS back: the orphan rows go
    vrs.ready = True
    assert backend.remove_orphans() == [PORT]
    assert vrs.vports == {}


def test_reassert_rewrites_joined_endpoints_only(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    backend.create_endpoint(ep_req(EID2, "10.21.59.6/24"))     # created, not joined
    vrs.vports.clear()                         # VRS lost its rows
    vrs.calls.clear()
    assert backend.reassert() == 1
    assert vrs.calls == [("ensure", PORT, False)]
    assert vrs.vports[PORT].vm_uuid == CID
    lin.links.clear()                          # the veth vanished: do not re-plug
    vrs.calls.clear()
    assert backend.reassert() == 0 and vrs.calls == []


def test_remove_orphans_keeps_joined_vports(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    stray, theirs = "nuv" + "f" * 12, "nuv" + "e" * 12
    cls, net = vrs.vports[PORT].__class__, vrs.vports[PORT].network
    vrs.vports[stray] = cls(stray, "7a:42:00:00:00:09", "alubr0", "10.21.59.9", net,
                            "f" * 64, "f" * 64, "gone", "nuage")
    # another plugin instance (driver name) on the same VRS: not ours to judge
    vrs.vports[theirs] = cls(theirs, "7a:42:00:00:00:0a", "alubr0", "10.21.59.10", net,
                             "e" * 64, "e" * 64, "other", "nuage2")
    assert backend.remove_orphans() == [stray]
    assert sorted(vrs.vports) == [PORT, theirs]


def test_startup_audit_removes_what_docker_forgot(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)                                  # Docker knows EID
    dock.containers[EID2] = Container("d" * 64, "db")
    backend.create_endpoint(ep_req(EID2, "10.21.59.6/24"))
    backend.join(join_req(EID2))
    del dock.containers[EID2]                              # Docker forgot EID2
    backend._started_at = time.time()                      # as if the plugin restarted
    result = backend.audit()
    assert result == {"dry_run": False, "vrs": "connected", "stale_endpoints": [EID2],
                      "pending": [], "orphan_vports": []}
    assert list(vrs.vports) == [PORT]
    assert lin.links == {PORT, PEER}
    assert [i.key.rsplit("/", 1)[1] for i in store.list_prefix(keys.endpoint_dir("h1"))] \
        == [EID]


def test_startup_audit_keeps_everything_without_docker(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    dock.containers.clear()
    dock.down = True
    backend._started_at = time.time()
    with pytest.raises(DockerUnavailable, match="cannot reach Docker"):
        backend.audit()
    assert list(vrs.vports) == [PORT] and lin.links == {PORT, PEER}
    backend.start()                            # the plugin still starts
    assert list(vrs.vports) == [PORT]


def test_audit_dry_run_only_reports(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    stray = "nuv" + "f" * 12
    cls, net = vrs.vports[PORT].__class__, vrs.vports[PORT].network
    vrs.vports[stray] = cls(stray, "7a:42:00:00:00:09", "alubr0", "10.21.59.9", net,
                            "f" * 64, "f" * 64, "gone", "nuage")
    dock.containers.clear()                    # Docker forgot EID too
    backend._started_at = time.time()
    summary = backend.audit(dry_run=True)
    assert summary == {"dry_run": True, "vrs": "connected", "stale_endpoints": [EID],
                       "pending": [], "orphan_vports": sorted([PORT, stray])}
    assert sorted(vrs.vports) == sorted([PORT, stray]) and lin.links == {PORT, PEER}
    assert record(store)["joined"] is True
    summary = backend.audit()
    assert summary["stale_endpoints"] == [EID] and summary["orphan_vports"] == [stray]
    assert vrs.vports == {} and lin.links == set()
    assert store.list_prefix(keys.endpoint_dir("h1")) == []


def test_startup_audit_spares_endpoints_newer_than_the_process(parts):
    backend, store, vrs, dock, lin = parts
    backend._started_at = time.time() - 1
    joined(backend, dock)
    dock.containers.clear()                    # Docker does not list it (yet)
    assert backend.audit()["stale_endpoints"] == []
    assert list(vrs.vports) == [PORT]


def test_startup_audit_with_vrs_down_finishes_when_vrs_connects(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    dock.containers.clear()                    # Docker forgot it
    vrs.ready = False
    backend._started_at = time.time()
    summary = backend.audit()
    assert summary["stale_endpoints"] == summary["pending"] == [EID]
    assert summary["vrs"].startswith("VRS OVSDB at unix:/fake/db.sock is not reachable")
    rec = record(store)
    assert (rec["stale"], rec["joined"], rec["vport"]) == (True, False, True)
    assert lin.links == set()                  # the veth goes at once
    assert backend.reassert() == 0             # never re-plugged
    vrs.ready = True                           # VRS connects: on_connect runs these
    backend.on_vrs_connect = backend.host_agent().on_vrs_connect   # as the agent does
    backend._on_vrs_connect(2)
    assert vrs.vports == {}
    assert store.list_prefix(keys.endpoint_dir("h1")) == []


def test_stale_record_without_rows_is_forgotten_on_connect(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    dock.containers.clear()
    vrs.ready = False
    backend._started_at = time.time()
    backend.audit()
    vrs.vports.clear()                         # VRS came back without the rows
    vrs.ready = True
    assert backend.remove_orphans() == []
    assert store.list_prefix(keys.endpoint_dir("h1")) == []


# --------------------------------------------------------------------------
# the agent: re-assertion and the audit loop run once per host


def agent(backend):
    """The host agent run with its stop already set: builds the loop; tests step it."""
    import threading
    stop = threading.Event()
    stop.set()
    host_agent = backend.host_agent()
    host_agent.run(stop)
    assert backend.on_vrs_connect is None      # detached when the run ends
    return host_agent.reconciler


def endpoint_keys(store):
    return [i.key.rsplit("/", 1)[1] for i in store.list_prefix(keys.endpoint_dir("h1"))]


def test_workers_do_not_audit_or_reassert_only_the_agent_does(parts):
    backend, store, vrs, dock, lin = parts
    assert NuageBackend.has_agent is True
    joined(backend, dock)
    dock.containers.clear()                    # Docker forgot it
    backend._started_at = time.time()
    backend.start()                            # a worker: no audit
    assert backend.on_vrs_connect is None      # no host agent in a worker
    backend._on_vrs_connect(2)                 # nor re-assertion on a connection
    assert list(vrs.vports) == [PORT] and endpoint_keys(store) == [EID]
    assert ("ensure", PORT, False) not in vrs.calls


def test_agent_loop_removes_nothing_on_a_momentarily_empty_docker_view(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    loop = agent(backend)
    backend._started_at = time.time() + 1      # the record predates the agent
    saved = dict(dock.containers)
    dock.containers.clear()                    # Docker answers "nothing" once
    loop.step()
    dock.containers.update(saved)              # and knows it again
    loop.step()
    assert list(vrs.vports) == [PORT] and endpoint_keys(store) == [EID]
    assert record(store)["joined"] is True


def test_agent_loop_removes_what_two_looks_agree_on(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    loop = agent(backend)
    backend._started_at = time.time() + 1
    dock.containers.clear()
    loop.step()                                # first look
    assert endpoint_keys(store) == [EID]
    loop.step()                                # second look agrees (grace 0)
    assert endpoint_keys(store) == [] and vrs.vports == {} and lin.links == set()


def test_agent_loop_keeps_a_record_that_changed_between_the_looks(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    loop = agent(backend)
    backend._started_at = time.time() + 1
    dock.containers.clear()
    loop.step()
    key = keys.endpoint("h1", EID)
    store.put(key, store.get(key).value)       # rewritten: a new version
    loop.step()
    assert endpoint_keys(store) == [EID] and list(vrs.vports) == [PORT]


def test_agent_loop_backs_off_while_docker_is_down(parts):
    backend, store, vrs, dock, lin = parts
    joined(backend, dock)
    loop = agent(backend)
    backend._started_at = time.time() + 1
    dock.containers.clear()
    dock.down = True
    assert [loop.step() for _ in range(3)] == [1.0, 2.0, 4.0]
    assert endpoint_keys(store) == [EID]
    dock.down = False
    loop.step()
    loop.step()
    assert endpoint_keys(store) == []


def test_endpoint_lock_is_host_wide(parts, tmp_path):
    """Two backend instances (two workers, or a worker and the agent) on the
    same state directory exclude each other for the same endpoint."""
    import threading
    backend, store, vrs, dock, lin = parts
    other = NuageBackend(backend.config, store, vrs=vrs, docker=dock, linux=lin)
    inside = threading.Event()
    release = threading.Event()

    def hold():
        with backend._endpoint_lock(EID):
            inside.set()
            release.wait(5)
    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(5)
    got = []
    t2 = threading.Thread(target=lambda: other._endpoint_lock(EID).__enter__() or got.append(1))
    t2.start()
    t2.join(0.3)
    assert got == []                           # blocked by the other instance
    release.set()
    t.join(5)
    t2.join(5)
    assert got == [1]
