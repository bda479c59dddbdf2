"""Calico networks shared by name across hosts (local scope), and who owns
what: profiles (per-host references), pools, addresses; Docker 28's calls."""
import json

import pytest

from backends.calico import model as keys
from backends.calico.driver import CalicoBackend
from netplugin import protocol as p
from netplugin.app import create_app
from netplugin.errors import Conflict, InvalidRequest
from tests.netns_runner import calico_backend
from tests.unit.test_calico_backend import FakeLinux, create_ep, create_net, net_body
from backends.calico import driver

NA = "a" * 64      # net1 on host-a
NB = "b" * 64      # net1 on host-b (its own NetworkID)
EA = "1" * 64
EB = "2" * 64


@pytest.fixture
def hosts(tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "linux", FakeLinux())
    a, store = calico_backend(str(tmp_path / "state.db"), hostname="host-a")
    b = CalicoBackend(calico_backend(str(tmp_path / "b.db"), hostname="host-b")[0].config,
                      store)
    names = {NA: "net1", NB: "net1"}
    for backend in (a, b):
        backend._docker_network_name = names.get
    yield a, b, store
    store.close()


def dump(store, prefix="/"):
    return {i.key: i.value for i in store.inner.list_prefix(prefix)}


def calico_net(nid, **kw):
    return create_net(nid, pool="0.0.0.0/0", gateway="0.0.0.0/0", **kw)


def test_same_name_on_two_hosts_is_one_profile_until_the_last_delete(hosts):
    a, b, store = hosts
    store.inner.put(keys.pool("192.168.0.0/16"), '{"cidr": "192.168.0.0/16"}')
    ipam_ip = {}
    for backend, nid, eid in ((a, NA, EA), (b, NB, EB)):
        backend.create_network(calico_net(nid))
        ip = backend.ipam.auto_assign_one(4, backend.hostname)
        ipam_ip[nid] = ip
        backend.create_endpoint(create_ep(nid, eid, address=f"{ip}/32"))
    eps = {k: json.loads(v) for k, v in dump(store, "/calico/v1/host/").items()
           if "/endpoint/" in k}
    assert {tuple(e["profile_ids"]) for e in eps.values()} == {("net1",)}
    assert json.loads(dump(store)[keys.profile_tags("net1")]) == ["net1"]
    assert set(dump(store, keys.profile_refs("net1"))) == {
        keys.profile_ref("net1", "host-a", NA), keys.profile_ref("net1", "host-b", NB)}
    a.delete_endpoint(p.EndpointRequest(NA, EA))
    a.delete_network(p.NetworkRequest(NA))
    assert keys.profile_tags("net1") in dump(store)          # host-b still has net1
    b.delete_endpoint(p.EndpointRequest(NB, EB))
    b.delete_network(p.NetworkRequest(NB))
    assert not dump(store, "/calico/v1/policy/") and not dump(store, "/calico/libnetwork/")
    assert keys.pool("192.168.0.0/16") in dump(store)


def test_profile_option_names_the_profile_at_create(hosts):
    a, b, store = hosts
    a.create_network(create_net(NA, generic={"profile": "team"}))
    b.create_network(create_net(NB, pool="10.20.0.0/24", gateway="10.20.0.1/24",
                                generic={"profile": "team"}))
    assert json.loads(dump(store)[keys.profile_tags("team")]) == ["team"]
    a.create_endpoint(create_ep(NA, EA))
    assert json.loads(dump(store)[keys.endpoint("host-a", EA)])["profile_ids"] == ["team"]
    with pytest.raises(InvalidRequest, match="profile"):
        a.create_network(create_net("c" * 64, pool="10.30.0.0/24", gateway="10.30.0.1/24",
                                    generic={"profile": "../x"}))


def test_docker_ipam_subnet_of_another_host_is_refused(hosts):
    a, b, store = hosts
    a.create_network(create_net(NA, pool="10.77.0.0/24", gateway="10.77.0.1/24"))
    before = dump(store)
    with pytest.raises(Conflict, match="--ipam-driver calico"):
        b.create_network(create_net(NB, pool="10.77.0.0/24", gateway="10.77.0.1/24"))
    assert dump(store) == before


def test_docker_ipam_subnet_overlapping_a_calico_pool_is_refused_pool_untouched(hosts):
    a, _, store = hosts
    pool_key = "/calico/v1/ipam/v4/pool/10.10.0.0-16"
    store.inner.put(pool_key, '{"cidr": "10.10.0.0/16",  "ipam": true}')
    before = dump(store)
    for subnet in ("10.10.0.0/16", "10.10.5.0/24", "10.0.0.0/8"):
        with pytest.raises(Conflict, match="10.10.0.0/16"):
            a.create_network(create_net(NA, pool=subnet, gateway=""))
    assert dump(store) == before


def test_delete_never_deletes_a_pool_it_did_not_write(hosts):
    a, _, store = hosts
    a.create_network(calico_net(NA))
    record = json.loads(dump(store)[keys.network(NA)])
    # an older record naming a pool that the operator owns
    del record["Netplugin"]
    record["IPv4Data"] = [{"AddressSpace": "x", "Pool": "10.10.0.0/24", "Gateway": ""}]
    store.inner.put(keys.network(NA), json.dumps(record))
    store.inner.put(keys.pool("10.10.0.0/24"), '{"cidr": "10.10.0.0/24"}')
    a.delete_network(p.NetworkRequest(NA))
    assert dump(store) == {keys.pool("10.10.0.0/24"): '{"cidr": "10.10.0.0/24"}'}


def test_create_endpoint_refuses_foreign_addresses(hosts):
    a, _, store = hosts
    a.create_network(create_net(NA, pool="10.10.0.0/24", gateway="10.10.0.1/24",
                                pool6="fd00:10::/64"))
    before = dump(store)
    for addr, addr6 in (("10.99.0.2/32", ""), ("10.10.0.5/24", "fd00:99::5/64")):
        with pytest.raises(InvalidRequest, match="outside the subnet"):
            a.create_endpoint(create_ep(NA, EA, address=addr, address6=addr6))
    a.create_network(calico_net(NB))
    before = dump(store)
    with pytest.raises(InvalidRequest, match="not allocated by Calico IPAM"):
        a.create_endpoint(create_ep(NB, EB, address="192.168.0.7/32"))
    assert dump(store) == before


def test_ipv6_only_network_and_docker_option_keys(hosts):
    a, _, store = hosts
    body = net_body(NA, pool=None, pool6="fd00:10::/64")
    body["Options"]["com.docker.network.enable_ipv4"] = False
    body["Options"]["com.docker.network.generic"] = {
        "com.docker.network.enable_ipv4": "false", "com.docker.network.driver.mtu": "1400"}
    a.create_network(p.CreateNetworkRequest.parse(body))
    a.create_endpoint(p.CreateEndpointRequest.parse({
        "NetworkID": NA, "EndpointID": EA,
        "Interface": {"Address": "", "AddressIPv6": "fd00:10::5/64"},
        "Options": {"com.docker.network.endpoint.ifname": "web0",
                    "com.docker.network.endpoint.sysctls": "net.ipv6.conf.IFNAME.mtu=1400"}}))
    ep = json.loads(dump(store)[keys.endpoint("host-a", EA)])
    assert ep["ipv4_nets"] == [] and ep["ipv6_nets"] == ["fd00:10::5/128"]


def test_gw_alloc_check_and_capabilities(hosts):
    a, _, _ = hosts
    client = create_app(a, "local").test_client()
    caps = client.post("/NetworkDriver.GetCapabilities").get_json(force=True)
    assert caps == {"Scope": "local", "ConnectivityScope": "local", "GwAllocChecker": True}
    resp = client.post("/NetworkDriver.GwAllocCheck", data=json.dumps(
        {"Options": {"com.docker.network.generic": {}}}))
    assert resp.status_code == 200
    assert resp.get_json(force=True) == {"SkipIPv4": True, "SkipIPv6": True}


@pytest.fixture
def swarm_hosts(tmp_path, monkeypatch):
    """Two hosts in global scope (swarm, cluster store): one NetworkID on both."""
    import copy
    monkeypatch.setattr(driver, "linux", FakeLinux())
    a, store = calico_backend(str(tmp_path / "state.db"), hostname="node-a")
    cfg_b = copy.deepcopy(a.config)
    cfg_b.calico.hostname = "node-b"
    a.config.scope = cfg_b.scope = "global"
    b = CalicoBackend(cfg_b, store)
    yield a, b, store
    store.close()


@pytest.mark.parametrize("ipam", ["docker", "calico"])
@pytest.mark.parametrize("first", ["creator", "other"])
def test_global_network_on_two_hosts_lives_until_the_last_host_deletes_it(swarm_hosts, first,
                                                                         ipam):
    """Each host's CreateNetwork holds a reference; the record written by
    the first host is kept (the other host's endpoints still need it) until
    the last host's DeleteNetwork removes record, profile and pool."""
    a, b, store = swarm_hosts
    nid = "5" * 25
    if ipam == "calico":
        store.inner.put(keys.pool("192.168.0.0/16"), '{"cidr": "192.168.0.0/16"}')
        net = calico_net(nid)

        def address(backend):
            return f"{backend.ipam.auto_assign_one(4, backend.hostname)}/32"
    else:
        net = create_net(nid)
        free = iter(range(5, 20))

        def address(backend):
            return f"10.10.0.{next(free)}/24"
    a.create_network(net)
    record = dump(store)[keys.network(nid)]
    b.create_network(net)
    assert dump(store)[keys.network(nid)] == record         # not rewritten by node-b
    assert set(dump(store, keys.profile_refs(nid))) == {
        keys.profile_ref(nid, "node-a", nid), keys.profile_ref(nid, "node-b", nid)}
    a.create_endpoint(create_ep(nid, EA, address=address(a)))
    b.create_endpoint(create_ep(nid, EB, address=address(b)))
    one, two = (a, b) if first == "creator" else (b, a)
    one.delete_endpoint(p.EndpointRequest(nid, EA if one is a else EB))
    one.delete_network(p.NetworkRequest(nid))
    kept = dump(store)
    assert keys.network(nid) in kept and keys.profile_tags(nid) in kept
    assert (keys.pool("10.10.0.0/24") in kept) == (ipam == "docker")
    assert set(dump(store, keys.profile_refs(nid))) == {
        keys.profile_ref(nid, two.hostname, nid)}
    # the other host goes on using the network
    e3 = "3" * 64
    two.create_endpoint(create_ep(nid, e3, address=address(two)))
    for eid in (EA if two is a else EB, e3):
        two.delete_endpoint(p.EndpointRequest(nid, eid))
    two.delete_network(p.NetworkRequest(nid))
    assert not dump(store, "/calico/libnetwork/") and not dump(store, "/calico/v1/policy/")
    assert not dump(store, "/calico/v1/host/")
    assert [k for k in dump(store, "/calico/v1/ipam/")] == (
        [keys.pool("192.168.0.0/16")] if ipam == "calico" else [])
