"""Calico backend with Docker's IPAM: datastore keys, per-call budgets, options,
and (inside throwaway network namespaces) the veth/route/sysctl effects."""
import base64
import json

import pytest

import backends.calico.driver  # noqa: F401  (registers "calico")
from backends.calico import driver, model as keys
from backends.calico.driver import CalicoBackend
from netplugin import protocol as p
from netplugin.backend import load_backend
from netplugin.datastore import CountingDatastore, DatastoreUnavailable
from netplugin.errors import InvalidRequest, NotFound, PluginError
from tests.netns_runner import calico_backend, netns_unavailable_reason, run_in_netns

NID = "3df319d886f3a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f607182930"
NID2 = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b"
EID = "27d4e97367f0aabbccddeeff00112233445566778899aabbccddeeff00112233"
HOST_IF = "cali27d4e97367f"
TEMP_IF = "tmp27d4e97367f"
EID2 = "38e5fa8478a1aabbccddeeff00112233445566778899aabbccddeeff00112233"
EP_KEY = f"/calico/v1/host/host-a/workload/libnetwork/libnetwork/endpoint/{EID}"
NET_KEY = f"/calico/libnetwork/v1/{NID}"
POOL4_KEY = "/calico/v1/ipam/v4/pool/10.10.0.0-24"
POOL6_KEY = "/calico/v1/ipam/v6/pool/fd00:10::-64"


# --------------------------------------------------------------------------
# request bodies as dockerd sends them


def net_body(nid=NID, pool="10.10.0.0/24", gateway="10.10.0.1/24", pool6=None,
             gateway6="fd00:10::1/64", generic=None):
    body = {
        "NetworkID": nid,
        "Options": {"com.docker.network.enable_ipv6": bool(pool6),
                    "com.docker.network.generic": dict(generic or {})},
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": pool, "Gateway": gateway,
                      "AuxAddresses": {}}] if pool else [],
        "IPv6Data": [{"AddressSpace": "LocalDefault", "Pool": pool6, "Gateway": gateway6,
                      "AuxAddresses": {}}] if pool6 else [],
    }
    return body


def record(body, profile="", pools=("10.10.0.0/24",), host="host-a"):
    """The network record: the CreateNetwork body and the plugin's own part."""
    return dict(body, Netplugin={"host": host, "profile": profile, "pools": list(pools)})


def create_net(nid=NID, **kw):
    return p.CreateNetworkRequest.parse(net_body(nid, **kw))


def create_ep(nid=NID, eid=EID, address="10.10.0.5/24", address6="", mac="", options=None):
    return p.CreateEndpointRequest.parse({
        "NetworkID": nid, "EndpointID": eid,
        "Interface": {"Address": address, "AddressIPv6": address6, "MacAddress": mac},
        "Options": options or {}})


def ep_req(nid=NID, eid=EID):
    return p.EndpointRequest.parse({"NetworkID": nid, "EndpointID": eid})


def join_req(nid=NID, eid=EID):
    return p.JoinRequest.parse({"NetworkID": nid, "EndpointID": eid,
                                "SandboxKey": "/var/run/docker/netns/0123456789ab",
                                "Options": {}})


# --------------------------------------------------------------------------
# in-process fixtures: real embedded store, fake Linux (no netlink here)


class FakeLinux:
    """Records the netlink/sysctl calls the backend makes (in-process tests
    must not touch the machine's network namespace)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return {"delete_link": False, "ipv6_available": True}.get(name)
        return record


@pytest.fixture
def fake_linux(monkeypatch):
    fake = FakeLinux()
    monkeypatch.setattr(driver, "linux", fake)
    return fake


@pytest.fixture
def env(tmp_path, fake_linux):
    backend, store = calico_backend(str(tmp_path / "state.db"))
    yield backend, store
    store.close()


def dump(store):
    """Every key in the store -> decoded JSON value (not counted)."""
    return {item.key: json.loads(item.value) for item in store.inner.list_prefix("/")}


def run(store, call, *args):
    store.reset()
    result = call(*args)
    return result, store.counts


def budget(r, w, d):
    return {"R": r, "W": w, "D": d}


# --------------------------------------------------------------------------
# registration


def test_registered_as_calico_with_ipam():
    assert load_backend("calico") is CalicoBackend
    assert CalicoBackend.name == "calico"
    assert CalicoBackend.implements_ipam is True


def test_interface_names_fit_linux_limit():
    assert driver.host_veth_name(EID) == HOST_IF and len(HOST_IF) == 15
    assert driver.temp_veth_name(EID) == TEMP_IF


def test_key_builders():
    assert keys.profile_tags(NID) == f"/calico/v1/policy/profile/{NID}/tags"
    assert keys.profile_rules(NID) == f"/calico/v1/policy/profile/{NID}/rules"
    assert keys.pool("192.168.0.0/16") == "/calico/v1/ipam/v4/pool/192.168.0.0-16"
    assert keys.pool("fd80:24e2:f998:72d6::/64") == \
        "/calico/v1/ipam/v6/pool/fd80:24e2:f998:72d6::-64"
    assert keys.network(NID) == NET_KEY
    assert keys.endpoint("host-a", EID) == EP_KEY


# --------------------------------------------------------------------------
# CreateNetwork


def test_create_network_writes_calico_v1_keys_in_budget(env):
    backend, store = env
    body = net_body()
    result, counts = run(store, backend.create_network, p.CreateNetworkRequest.parse(body))
    assert result is None
    # 2R: other networks' subnets and the Calico pools (never overlap one);
    # the profile is written at the first CreateEndpoint (named after the network).
    assert counts == budget(2, 2, 0)
    assert dump(store) == {
        POOL4_KEY: {"cidr": "10.10.0.0/24", "ipam": False},
        NET_KEY: record(body),
    }


def test_create_network_ipv6_subnet_costs_one_more_write(env):
    backend, store = env
    _, counts = run(store, backend.create_network, create_net(pool6="fd00:10::/64"))
    assert counts == budget(3, 3, 0)
    data = dump(store)
    assert data[POOL6_KEY] == {"cidr": "fd00:10::/64", "ipam": False}
    assert data[POOL4_KEY] == {"cidr": "10.10.0.0/24", "ipam": False}
    assert data[NET_KEY]["IPv6Data"][0]["Pool"] == "fd00:10::/64"


@pytest.mark.parametrize("text,expected", [
    ("true", True), ("TRUE", True), ("yes", True), ("On", True), ("1", True),
    ("false", False), ("False", False), ("no", False), ("OFF", False), ("0", False),
])
def test_boolean_options(env, text, expected):
    backend, store = env
    backend.create_network(create_net(pool6="fd00:10::/64",
                                      generic={"ipip": text, "nat-outgoing": text}))
    data = dump(store)
    v4 = {"cidr": "10.10.0.0/24", "ipam": False}
    v6 = {"cidr": "fd00:10::/64", "ipam": False}
    if expected:
        v4.update(ipip="tunl0", masquerade=True)
        v6.update(masquerade=True)        # no IPIP on IPv6 pools
    assert data[POOL4_KEY] == v4
    assert data[POOL6_KEY] == v6


def test_options_are_independent(env):
    backend, store = env
    backend.create_network(create_net(generic={"nat-outgoing": "yes"}))
    assert dump(store)[POOL4_KEY] == {"cidr": "10.10.0.0/24", "masquerade": True,
                                      "ipam": False}


@pytest.mark.parametrize("value", ["maybe", "", "2", "truee"])
def test_bad_boolean_option_is_refused_before_any_write(env, value):
    backend, store = env
    store.reset()
    with pytest.raises(InvalidRequest) as exc:
        backend.create_network(create_net(generic={"ipip": value}))
    assert str(exc.value) == f"network option 'ipip' must be true or false, got {value!r}"
    assert store.counts == budget(0, 0, 0)
    assert dump(store) == {}


def test_unknown_option_leaves_no_keys(env):
    backend, store = env
    store.reset()
    with pytest.raises(InvalidRequest) as exc:
        backend.create_network(create_net(generic={"ipip": "true", "colour": "blue"}))
    msg = str(exc.value)
    assert "'colour'" in msg and "ipip" in msg and "nat-outgoing" in msg and "mtu" in msg
    assert store.counts == budget(0, 0, 0)
    assert dump(store) == {}


@pytest.mark.parametrize("kw", [
    {"pool": "0.0.0.0/0", "gateway": "0.0.0.0/0"},
    {"pool": "0.0.0.0/0", "gateway": "0.0.0.0/0", "pool6": "100::/64", "gateway6": "::/0"},
    {"pool": "192.168.0.0/24", "gateway": "0.0.0.0/0"},       # --subnet inside a pool
])
def test_calico_ipam_network_writes_no_pool(env, kw):
    """Calico IPAM (gateway marker from our RequestPool): profile + record only,
    0R 1W; DeleteNetwork 1R 1D and no pool deleted."""
    backend, store = env
    store.inner.put(POOL4_KEY, json.dumps({"cidr": "10.10.0.0/24"}))   # a Calico pool
    body = net_body(**kw)
    _, counts = run(store, backend.create_network, p.CreateNetworkRequest.parse(body))
    assert counts == budget(0, 1, 0)
    assert dump(store) == {
        POOL4_KEY: {"cidr": "10.10.0.0/24"},
        NET_KEY: record(body, pools=()),
    }
    _, counts = run(store, backend.delete_network, p.NetworkRequest(NID))
    assert counts == budget(1, 0, 1)
    assert dump(store) == {POOL4_KEY: {"cidr": "10.10.0.0/24"}}


def test_calico_ipam_network_refuses_pool_options(env):
    backend, store = env
    with pytest.raises(InvalidRequest, match="only apply with Docker's IPAM"):
        backend.create_network(create_net(pool="0.0.0.0/0", gateway="0.0.0.0/0",
                                          generic={"nat-outgoing": "true"}))
    backend.create_network(create_net(pool="0.0.0.0/0", gateway="0.0.0.0/0",
                                      generic={"ipip": "false"}))   # false: harmless
    assert NET_KEY in dump(store)


def test_more_than_one_subnet_per_version_is_refused(env):
    backend, store = env
    body = net_body()
    body["IPv4Data"].append({"AddressSpace": "LocalDefault", "Pool": "10.20.0.0/24",
                             "Gateway": "10.20.0.1/24"})
    with pytest.raises(InvalidRequest, match="at most one IPv4 and one IPv6"):
        backend.create_network(p.CreateNetworkRequest.parse(body))
    assert dump(store) == {}


def test_network_without_subnet_is_refused(env):
    backend, store = env
    with pytest.raises(InvalidRequest, match="no IPv4Data or IPv6Data"):
        backend.create_network(create_net(pool=None))
    assert dump(store) == {}


class FailingStore(CountingDatastore):
    """Fails every write to keys containing ``fail_on``."""

    def __init__(self, inner, fail_on):
        super().__init__(inner)
        self.fail_on = fail_on

    def put(self, key, value):
        if self.fail_on in key:
            self._count("put", key)
            raise DatastoreUnavailable(f"etcd is down (writing {key})")
        return super().put(key, value)

    def get(self, key):
        if self.fail_on in key:
            self._count("get", key)
            raise DatastoreUnavailable(f"etcd is down (reading {key})")
        return super().get(key)


def test_failed_write_rolls_back_and_reraises(env):
    backend, store = env
    failing = FailingStore(store.inner, "/ipam/v4/pool/")
    backend = CalicoBackend(backend.config, failing)
    with pytest.raises(DatastoreUnavailable, match="etcd is down"):
        backend.create_network(create_net())
    assert dump(store) == {}


def test_datastore_error_propagates_unchanged(env):
    backend, store = env
    backend.create_network(create_net())
    failing = CalicoBackend(backend.config, FailingStore(store.inner, "/calico/libnetwork/"))
    with pytest.raises(DatastoreUnavailable) as exc:
        failing.create_endpoint(create_ep())
    assert isinstance(exc.value, PluginError)
    assert str(exc.value) == f"etcd is down (reading {NET_KEY})"


# --------------------------------------------------------------------------
# DeleteNetwork


def test_delete_network_in_budget_removes_everything(env):
    backend, store = env
    backend.create_network(create_net())
    _, counts = run(store, backend.delete_network, p.NetworkRequest(NID))
    assert counts == budget(1, 0, 2)
    assert dump(store) == {}


def test_delete_network_with_ipv6_deletes_both_pools(env):
    backend, store = env
    backend.create_network(create_net(pool6="fd00:10::/64"))
    _, counts = run(store, backend.delete_network, p.NetworkRequest(NID))
    assert counts == budget(1, 0, 3)
    assert dump(store) == {}


def test_delete_network_is_idempotent_and_leaves_other_networks(env):
    backend, store = env
    backend.create_network(create_net())
    backend.create_network(create_net(NID2, pool="10.20.0.0/24", gateway="10.20.0.1/24"))
    other = {k: v for k, v in dump(store).items() if NID2 in k or "10.20.0.0" in k}
    assert len(other) == 2
    backend.delete_network(p.NetworkRequest(NID))
    _, counts = run(store, backend.delete_network, p.NetworkRequest(NID))
    assert counts == budget(1, 0, 0)      # record missing: nothing
    assert dump(store) == other


def test_delete_network_of_unknown_id_changes_nothing(env):
    """A profile made with netpluginctl (no such network) survives a raw
    DeleteNetwork with its name, and so does everything else."""
    backend, store = env
    backend.create_network(create_net())
    store.inner.put("/calico/v1/policy/profile/team-web-policy/tags", '["team-web-policy"]')
    before = dump(store)
    store.inner.delete(NET_KEY)
    backend.delete_network(p.NetworkRequest("team-web-policy"))
    backend.delete_network(p.NetworkRequest(NID))
    del before[NET_KEY]
    assert dump(store) == before


def test_delete_network_tolerates_missing_pool(env):
    backend, store = env
    backend.create_network(create_net())
    store.inner.delete(POOL4_KEY)
    backend.delete_network(p.NetworkRequest(NID))
    assert dump(store) == {}


# --------------------------------------------------------------------------
# CreateEndpoint / DeleteEndpoint / Leave / Join (datastore side)


def test_create_endpoint_writes_endpoint_in_budget(env):
    backend, store = env
    backend.create_network(create_net(pool6="fd00:10::/64"))
    resp, counts = run(store, backend.create_endpoint,
                       create_ep(address6="fd00:10::5/64"))
    # The first endpoint learns the profile (Docker does not answer here: the
    # NetworkID), stores it with this host's reference and writes the profile.
    assert counts == budget(2, 5, 0)
    assert dump(store)[NET_KEY]["Netplugin"]["profile"] == NID
    assert dump(store)[f"/calico/libnetwork/refs/{NID}/host-a/{NID}"] == {"network": NID}
    _, counts = run(store, backend.create_endpoint,
                    create_ep(eid=EID2, address="10.10.0.6/24"))
    assert counts == budget(2, 1, 0)
    assert resp.to_json() == {"Interface": {"MacAddress": "ee:ee:ee:ee:ee:ee"}}
    assert dump(store)[EP_KEY] == {
        "state": "active", "name": HOST_IF, "mac": "ee:ee:ee:ee:ee:ee",
        "profile_ids": [NID], "labels": {},
        "ipv4_nets": ["10.10.0.5/32"], "ipv6_nets": ["fd00:10::5/128"]}


def test_create_endpoint_ipv4_only(env):
    backend, store = env
    backend.create_network(create_net())
    backend.create_endpoint(create_ep())
    ep = dump(store)[EP_KEY]
    assert ep["ipv4_nets"] == ["10.10.0.5/32"] and ep["ipv6_nets"] == []


def test_create_endpoint_keeps_dockers_mac_and_does_not_repeat_it(env):
    backend, store = env
    backend.create_network(create_net())
    resp = backend.create_endpoint(create_ep(mac="02:42:0A:0A:00:05"))
    assert resp is None or resp.to_json() == {}
    assert dump(store)[EP_KEY]["mac"] == "02:42:0a:0a:00:05"


def test_create_endpoint_mac_from_options(env):
    backend, store = env
    backend.create_network(create_net())
    mac = base64.b64encode(bytes([2, 0x42, 10, 10, 0, 6])).decode()
    resp = backend.create_endpoint(create_ep(options={p.MAC_OPTION: mac}))
    assert resp is None or resp.to_json() == {}
    assert dump(store)[EP_KEY]["mac"] == "02:42:0a:0a:00:06"


def test_create_endpoint_on_unknown_network(env):
    backend, store = env
    store.reset()
    with pytest.raises(NotFound) as exc:
        backend.create_endpoint(create_ep())
    assert str(exc.value) == f"network {NID} is not known to the calico plugin"
    assert store.counts == budget(1, 0, 0)
    assert dump(store) == {}


def test_create_endpoint_needs_an_address(env):
    backend, store = env
    backend.create_network(create_net())
    with pytest.raises(InvalidRequest, match="Interface.Address"):
        backend.create_endpoint(create_ep(address=""))
    assert EP_KEY not in dump(store)


def test_delete_endpoint_in_budget_and_idempotent(env, fake_linux):
    backend, store = env
    backend.create_network(create_net())
    backend.create_endpoint(create_ep())
    fake_linux.calls.clear()
    _, counts = run(store, backend.delete_endpoint, ep_req())
    assert counts == budget(1, 0, 1)
    assert EP_KEY not in dump(store)
    assert ("delete_link", (HOST_IF,), {}) in fake_linux.calls
    fake_linux.calls.clear()
    _, counts = run(store, backend.delete_endpoint, ep_req())   # already gone
    assert counts == budget(1, 0, 0)
    assert fake_linux.calls == []                              # no interface touched


def test_leave_reads_the_record_and_unknown_endpoints_touch_nothing(env, fake_linux):
    backend, store = env
    _, counts = run(store, backend.leave, ep_req())
    assert counts == budget(1, 0, 0)
    assert fake_linux.calls == []
    backend.create_network(create_net())
    backend.create_endpoint(create_ep())
    backend.leave(ep_req())
    assert fake_linux.calls == [("delete_link", (HOST_IF,), {})]


def test_join_reads_endpoint_once_and_answers_routed_gateway(env, fake_linux):
    backend, store = env
    backend.create_network(create_net())
    backend.create_endpoint(create_ep())
    fake_linux.calls.clear()
    resp, counts = run(store, backend.join, join_req())
    assert counts == budget(1, 0, 0)
    assert resp.to_json() == {
        "InterfaceName": {"SrcName": TEMP_IF, "DstPrefix": "eth"},
        "Gateway": "169.254.1.1",
        "StaticRoutes": [{"Destination": "169.254.1.1/32", "RouteType": 1, "NextHop": ""}],
        "DisableGatewayService": True}
    names = [c[0] for c in fake_linux.calls]
    assert names[0] == "create_veth"
    assert fake_linux.calls[0] == ("create_veth", (HOST_IF, TEMP_IF),
                                   {"mtu": 1400, "peer_mac": "ee:ee:ee:ee:ee:ee",
                                    "alias": "netplugin:calico:" + EID})
    assert ("replace_host_route", ("10.10.0.5/32", HOST_IF), {}) in fake_linux.calls
    assert "add_address" not in names     # no IPv6 on this endpoint


def test_join_dual_stack_answers_an_on_link_route_to_each_gateway(env, fake_linux):
    """Docker (>= 26 checks it) sets the IPv6 default route only when a direct
    route to fe80::1 exists in the container: Join hands it one, connected
    (RouteType 1: Docker puts it on eth0 right after raising it)."""
    backend, store = env
    backend.create_network(create_net(pool6="fd00:10::/64"))
    backend.create_endpoint(create_ep(address6="fd00:10::5/64"))
    resp, counts = run(store, backend.join, join_req())
    assert counts == budget(1, 0, 0)
    assert resp.to_json() == {
        "InterfaceName": {"SrcName": TEMP_IF, "DstPrefix": "eth"},
        "Gateway": "169.254.1.1", "GatewayIPv6": "fe80::1",
        "StaticRoutes": [{"Destination": "169.254.1.1/32", "RouteType": 1, "NextHop": ""},
                         {"Destination": "fe80::1/128", "RouteType": 1, "NextHop": ""}],
        "DisableGatewayService": True}
    assert ("add_address", (HOST_IF, "fe80::1/64"), {"nodad": True}) in fake_linux.calls


def test_join_ipv6_only_answers_the_ipv6_gateway_and_its_route_only(env, fake_linux):
    backend, store = env
    backend.create_network(create_net(pool=None, pool6="fd00:10::/64"))
    backend.create_endpoint(create_ep(address="", address6="fd00:10::5/64"))
    resp = backend.join(join_req())
    assert resp.to_json() == {
        "InterfaceName": {"SrcName": TEMP_IF, "DstPrefix": "eth"},
        "GatewayIPv6": "fe80::1",
        "StaticRoutes": [{"Destination": "fe80::1/128", "RouteType": 1, "NextHop": ""}],
        "DisableGatewayService": True}


def test_join_unknown_endpoint_is_not_found(env, fake_linux):
    backend, store = env
    with pytest.raises(NotFound, match=EID):
        backend.join(join_req())
    assert fake_linux.calls == []


def test_endpoint_oper_info_is_empty(env):
    backend, store = env
    _, counts = run(store, backend.endpoint_oper_info, ep_req())
    assert _ == {} and counts == budget(0, 0, 0)


# --------------------------------------------------------------------------
# netlink effects, each in its own throwaway network namespace

netns = pytest.mark.skipif(netns_unavailable_reason() is not None,
                           reason=str(netns_unavailable_reason()))

SETUP = """
from netplugin import protocol as p
from netplugin import linux
from netplugin.errors import PluginError
import tests.unit.test_calico_backend as t
backend, store = calico_backend(STATE)
"""


def netns_run(tmp_path, body, **kw):
    code = f"STATE = {str(tmp_path / 'state.db')!r}\n" + SETUP + body
    return run_in_netns(code, **kw)


@netns
def test_join_leave_netlink_effects(tmp_path):
    out = netns_run(tmp_path, """
backend.create_network(t.create_net(pool6="fd00:10::/64"))
backend.create_endpoint(t.create_ep(address6="fd00:10::5/64"))
store.reset()
resp = backend.join(t.join_req())
res = {"join": resp.to_json(), "join_counts": store.counts, "links": links(),
       "routes": routes(t.HOST_IF), "addrs": addresses(t.HOST_IF),
       "proxy_arp": sysctl(f"net/ipv4/conf/{t.HOST_IF}/proxy_arp"),
       "proxy_delay": sysctl(f"net/ipv4/neigh/{t.HOST_IF}/proxy_delay")}
store.reset()
backend.leave(t.ep_req())
res["leave_counts"] = store.counts
res["links_after"] = sorted(links())
res["routes_after"] = routes()
emit(res)
""")
    assert out["join_counts"] == budget(1, 0, 0)
    assert out["join"] == {
        "InterfaceName": {"SrcName": TEMP_IF, "DstPrefix": "eth"},
        "Gateway": "169.254.1.1", "GatewayIPv6": "fe80::1",
        "StaticRoutes": [{"Destination": "169.254.1.1/32", "RouteType": 1, "NextHop": ""},
                         {"Destination": "fe80::1/128", "RouteType": 1, "NextHop": ""}],
        "DisableGatewayService": True}
    host, temp = out["links"][HOST_IF], out["links"][TEMP_IF]
    assert host["kind"] == temp["kind"] == "veth"
    assert host["mtu"] == temp["mtu"] == 1400
    assert host["up"] is True and temp["up"] is False   # Docker moves and raises it
    assert temp["mac"] == "ee:ee:ee:ee:ee:ee"
    got = {(r["dst"], r["dev"], r.get("scope")) for r in out["routes"]}
    assert ("10.10.0.5", HOST_IF, "link") in got
    assert any(dst == "fd00:10::5" and dev == HOST_IF for dst, dev, _ in got)
    assert len(got) == 2
    assert "fe80::1/64" in out["addrs"]
    assert out["proxy_arp"] == "1" and out["proxy_delay"] == "0"
    assert out["leave_counts"] == budget(1, 0, 0)
    assert out["links_after"] == ["lo"]
    assert out["routes_after"] == []


@netns
def test_join_routes_let_docker_set_the_ipv6_gateway_at_once(tmp_path):
    """What Docker does with Join's answer, in a sandbox namespace of its own:
    move the veth in, raise it as eth0, add the connected StaticRoutes, then
    (libnetwork ``programGateway``) ``route get`` the gateway, which must give
    a direct route, and add the default route via it.

    Right after Docker raised eth0 the kernel's fe80::/64 may not exist yet:
    IPv6 addrconf adds it once it sees the carrier, which the kernel reports
    asynchronously (Docker 26 under load loses that race).  That moment is
    made deterministic here by holding the host end down (no carrier, no
    fe80::/64): the /128 from Join must be enough; and with the carrier."""
    out = netns_run(tmp_path, """
import subprocess, time
backend.create_network(t.create_net(pool6="fd00:10::/64"))
got = {}
for i, carrier in enumerate(("no carrier yet", "carrier")):
    eid = f"{i:02d}" + t.EID[2:]
    backend.create_endpoint(t.create_ep(eid=eid, address6="fd00:10::5/64"))
    answer = backend.join(t.join_req(eid=eid)).to_json()
    host = "cali" + eid[:11]
    if carrier != "carrier":
        subprocess.run(["ip", "link", "set", host, "down"], check=True)
    sandbox = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        mine = os.readlink("/proc/self/ns/net")
        while os.readlink(f"/proc/{sandbox.pid}/ns/net") == mine:
            time.sleep(0.01)
        src, gw = answer["InterfaceName"]["SrcName"], answer["GatewayIPv6"]
        subprocess.run(["ip", "link", "set", src, "netns", str(sandbox.pid)], check=True)
        batch = [f"link set {src} down", f"link set {src} name eth0",
                 "addr add fd00:10::5/64 dev eth0 nodad", "link set eth0 up"]
        batch += [f"route add {r['Destination']} dev eth0 scope link"
                  for r in answer["StaticRoutes"] if r["RouteType"] == 1]
        batch += [f"route get {gw}", f"route add ::/0 via {gw} dev eth0"]
        run = subprocess.run(["nsenter", "-t", str(sandbox.pid), "-n",
                              "ip", "-j", "-force", "-batch", "-"],
                             input="\\n".join(batch), capture_output=True, text=True)
        found = [r for line in run.stdout.splitlines() if line.startswith("[")
                 for r in json.loads(line)]
        got[carrier] = {"route_get": [{"gateway": r.get("gateway"), "dev": r.get("dev")}
                                      for r in found],
                        "rc": run.returncode, "err": run.stderr}
    finally:
        sandbox.kill()
        sandbox.wait()
    backend.leave(t.ep_req(eid=eid))
emit(got)
""", timeout=60)
    want = {"route_get": [{"gateway": None, "dev": "eth0"}], "rc": 0, "err": ""}
    assert out == {"no carrier yet": want, "carrier": want}


@netns
def test_repeated_join_replaces_veth(tmp_path):
    out = netns_run(tmp_path, """
backend.create_network(t.create_net())
backend.create_endpoint(t.create_ep())
backend.join(t.join_req())
first = links()[t.HOST_IF]["index"]
backend.join(t.join_req())
now = links()
emit({"first": first, "second": now[t.HOST_IF]["index"], "names": sorted(now),
      "routes": routes(t.HOST_IF)})
""")
    assert out["second"] != out["first"]
    assert out["names"] == sorted(["lo", HOST_IF, TEMP_IF])
    assert [r["dst"] for r in out["routes"]] == ["10.10.0.5"]


@netns
def test_join_rolls_back_veth_when_route_fails(tmp_path):
    out = netns_run(tmp_path, """
from backends.calico import driver
backend.create_network(t.create_net())
backend.create_endpoint(t.create_ep())
real = linux.replace_host_route
def failing_route(address, ifname):
    real(address, ifname)
    raise PluginError(f"cannot add route {address} dev {ifname}: Invalid argument")
driver.linux.replace_host_route = failing_route
try:
    backend.join(t.join_req())
    err = None
except PluginError as exc:
    err = str(exc)
emit({"err": err, "links": sorted(links()), "routes": routes()})
""")
    assert out["err"] == f"cannot add route 10.10.0.5/32 dev {HOST_IF}: Invalid argument"
    assert out["links"] == ["lo"]
    assert out["routes"] == []


@netns
def test_join_rolls_back_veth_when_sysctl_fails(tmp_path):
    out = netns_run(tmp_path, """
backend.create_network(t.create_net())
backend.create_endpoint(t.create_ep())
linux.PROC_SYS = "/nonexistent/proc/sys"
try:
    backend.join(t.join_req())
    err = None
except PluginError as exc:
    err = str(exc)
emit({"err": err, "links": sorted(links())})
""")
    assert out["err"].startswith(f"cannot set sysctl net/ipv4/conf/{HOST_IF}/proxy_arp=1:")
    assert out["links"] == ["lo"]


@netns
def test_delete_endpoint_without_leave_removes_veth(tmp_path):
    out = netns_run(tmp_path, """
backend.create_network(t.create_net())
backend.create_endpoint(t.create_ep())
backend.join(t.join_req())
store.reset()
backend.delete_endpoint(t.ep_req())
res = {"counts": store.counts, "links": sorted(links()),
       "key": store.inner.list_prefix("/calico/v1/host/") != []}
backend.leave(t.ep_req())              # absent veth: still fine
backend.delete_endpoint(t.ep_req())    # absent key and veth: still fine
emit(res)
""")
    assert out == {"counts": budget(1, 0, 1), "links": ["lo"], "key": False}


@netns
def test_start_enables_forwarding_in_its_netns(tmp_path):
    out = netns_run(tmp_path, """
# a new netns copies IPv4 settings from the machine's: start from off here
open("/proc/sys/net/ipv4/ip_forward", "w").write("0")
before = [sysctl("net/ipv4/ip_forward"), sysctl("net/ipv6/conf/all/forwarding")]
backend.start()
emit({"before": before,
      "after": [sysctl("net/ipv4/ip_forward"), sysctl("net/ipv6/conf/all/forwarding")]})
""")
    assert out["before"][0] == "0"
    assert out["after"][0] == "1"
    # IPv6 forwarding waits for an IPv6 endpoint (it disables RA on the host).
    assert out["after"][1] == out["before"][1]


@netns
def test_linux_helpers_errors_and_idempotency():
    out = run_in_netns("""
from netplugin import linux
from netplugin.errors import PluginError
res = {}
res["del_absent"] = linux.delete_link("caliabsent")
linux.create_veth("caliA", "tmpA", mtu=1300, peer_mac="02:00:00:00:00:0a")
idx = linux.link_info("caliA")["index"]
res["no_alias"] = linux.link_alias("caliA")
linux.create_veth("caliA", "tmpA", mtu=1300, alias="netplugin:test")   # replaces the old pair
res["replaced"] = linux.link_info("caliA")["index"] != idx
res["alias"] = [linux.link_alias("caliA"), linux.link_alias("tmpA"), linux.link_alias("nosuch")]
res["peer"] = linux.link_info("tmpA")
linux.set_link_up("caliA")
linux.replace_host_route("10.1.2.3/24", "caliA")
linux.replace_host_route("10.1.2.3", "caliA")          # idempotent
linux.add_address("caliA", "fe80::1/64", nodad=True)
linux.add_address("caliA", "fe80::1/64", nodad=True)   # idempotent
res["routes"] = linux.list_routes("caliA")
res["addrs"] = linux.list_addresses("caliA")
# an unrelated interface already holding the peer name is not touched
import subprocess
subprocess.run(["ip", "link", "add", "tmpB", "type", "veth", "peer", "name", "otherB"],
               check=True)
try:
    linux.create_veth("caliB", "tmpB")
except PluginError as exc:
    res["exists"] = str(exc)
res["tmpB_kept"] = linux.link_exists("tmpB")
try:
    linux.set_link_up("nosuchif")
except PluginError as exc:
    res["up_absent"] = str(exc)
try:
    linux.create_veth("a-name-that-is-too-long", "tmpC")
except PluginError as exc:
    res["too_long"] = str(exc)
res["deleted"] = linux.delete_link("caliA")
res["peer_gone"] = not linux.link_exists("tmpA")
linux.write_sysctl("net/ipv4/ip_forward", 1)
res["fwd"] = linux.read_sysctl("net/ipv4/ip_forward")
res["ensure_again"] = linux.ensure_sysctl("net/ipv4/ip_forward", 1)
emit(res)
""")
    assert out["del_absent"] is False
    assert out["replaced"] is True
    assert out["no_alias"] is None and out["alias"] == ["netplugin:test", None, None]
    assert out["peer"]["mtu"] == 1300 and out["peer"]["kind"] == "veth"
    assert out["routes"] == ["10.1.2.3/32"]
    assert "fe80::1/64" in out["addrs"]
    assert out["exists"] == "cannot create veth caliB: File exists"
    assert out["tmpB_kept"] is True
    assert out["up_absent"].startswith("cannot set link nosuchif up:")
    assert "invalid interface name" in out["too_long"]
    assert out["deleted"] is True and out["peer_gone"] is True
    assert out["fwd"] == "1" and out["ensure_again"] is False
