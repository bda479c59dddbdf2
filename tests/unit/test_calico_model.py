"""backends.calico.model: record round trips, keys, interface names, rule
validation, and how corrupt values are read."""
from __future__ import annotations

import ipaddress
import json

import pytest

from backends.calico import model as m

EID = "27d4e97367f0a1b2c3d4e5f60718293a4b5c6d7e8f9012345678901234567890"
NID = "3df3190abc"


# -- keys -------------------------------------------------------------------------


def test_keys():
    assert m.endpoint("h1", EID) == (
        f"/calico/v1/host/h1/workload/libnetwork/libnetwork/endpoint/{EID}")
    assert m.parse_endpoint_key(m.endpoint("h1", EID)) == ("h1", "libnetwork", "libnetwork",
                                                           EID)
    assert m.parse_endpoint_key("/calico/v1/host/h1/bird_ip") is None
    assert m.is_endpoint_key("/calico/v1/host/h/workload/k8s/pod/endpoint/e")
    assert m.profile_tags("p") == "/calico/v1/policy/profile/p/tags"
    assert m.parse_profile_key("/calico/v1/policy/profile/p/rules") == ("p", "rules")
    assert m.parse_profile_key("/calico/v1/policy/profile/p/x") is None
    assert m.pool("10.0.0.7/24") == "/calico/v1/ipam/v4/pool/10.0.0.0-24"
    assert m.pool("fd00::/64") == "/calico/v1/ipam/v6/pool/fd00::-64"
    assert m.network(NID) == f"/calico/libnetwork/v1/{NID}"
    assert m.profile_ref("p", "h", NID) == f"/calico/libnetwork/refs/p/h/{NID}"
    assert m.bird_ip_key("h") == "/calico/v1/host/h/bird_ip"
    assert m.parse_bird_ip_key(m.bird_ip_key("h")) == ("h", 4)
    assert m.parse_bird_ip_key(m.bird6_ip_key("h")) == ("h", 6)
    assert m.parse_bird_ip_key("/calico/v1/host/h/bird_ipx") is None
    assert m.tunnel_address_host("/calico/v1/host/h/config/IpInIpTunnelAddr") == "h"
    assert m.block_key("10.0.0.64/26") == "/calico/ipam/v2/assignment/ipv4/block/10.0.0.64-26"
    assert m.host_affinity_key("h", "10.0.0.64/26") == \
        "/calico/ipam/v2/host/h/ipv4/block/10.0.0.64-26"
    assert m.parse_affinity_key(m.host_affinity_key("h", "fd00::40/122")) == \
        ("h", 6, "fd00::40-122")
    assert m.handle_key("x") == "/calico/ipam/v2/handle/x"
    assert m.removed_key("h") == "/calico/libnetwork/removed-hosts/h"
    assert m.cidr_from_key(m.block_key("fd00::40/122")) == ipaddress.ip_network("fd00::40/122")
    assert m.block_cidr_for("10.0.0.70") == ipaddress.ip_network("10.0.0.64/26")


def test_interface_names():
    assert m.host_veth_name(EID) == "cali27d4e97367f"
    assert m.temp_veth_name(EID) == "tmp27d4e97367f"
    assert len(m.host_veth_name(EID)) == 15
    assert m.HOST_DEVICE_RE.match(m.host_veth_name(EID))
    assert m.is_our_veth(m.host_veth_name(EID), m.veth_marker(EID))
    assert not m.is_our_veth(m.host_veth_name(EID), "something else")
    assert not m.is_our_veth("cali0123456789a", m.veth_marker(EID))


# -- endpoints --------------------------------------------------------------------


def _endpoint(**kw):
    fields = dict(host="h1", endpoint_id=EID, name=m.host_veth_name(EID),
                  profile_ids=("p",), ipv4_nets=("10.0.0.5/32",), ipv6_nets=(),
                  mac="ee:ee:ee:ee:ee:ee")
    fields.update(kw)
    return m.Endpoint(**fields)


def test_endpoint_json_is_the_layout_create_endpoint_writes():
    ep = _endpoint(mtu=1400, network_id=NID)
    assert ep.to_json() == json.dumps({
        "state": "active", "name": "cali27d4e97367f", "mac": "ee:ee:ee:ee:ee:ee",
        "profile_ids": ["p"], "labels": {}, "ipv4_nets": ["10.0.0.5/32"], "ipv6_nets": [],
        "mtu": 1400, "network_id": NID})
    back = m.Endpoint.from_json(ep.key, ep.to_json())
    assert back == ep and back.to_json() == ep.to_json()
    assert back.key == m.endpoint("h1", EID)
    assert back.network == NID and back.ipv4 == ("10.0.0.5",) and back.active


def test_endpoint_round_trip_keeps_other_writers_fields():
    value = json.dumps({"state": "inactive", "name": "cali1", "profile_ids": ["a", "b"],
                        "ipv4_nets": ["10.0.0.1/32", "10.0.0.1/32"],
                        "ipv6_nets": ["fd00::1/128"], "labels": {"x": "y"},
                        "expected_ipv4_addrs": ["10.0.0.1"]})
    key = "/calico/v1/host/h2/workload/k8s/pod/endpoint/e1"
    ep = m.Endpoint.from_json(key, value)
    assert not ep.libnetwork and not ep.active and ep.key == key
    assert ep.ipv4 == ("10.0.0.1",) and ep.ipv6 == ("fd00::1",)
    assert ep.network == "a" and ep.mac is None
    assert json.loads(ep.to_json())["expected_ipv4_addrs"] == ["10.0.0.1"]
    assert json.loads(ep.to_json())["labels"] == {"x": "y"}
    assert ep.policy_problem() is None
    with pytest.raises(m.CorruptRecord, match="no mac"):
        ep.check_join()


def test_endpoint_legacy_profile_id():
    ep = m.Endpoint.from_json(m.endpoint("h", "e"), json.dumps({"name": "calie",
                                                               "profile_id": "old"}))
    assert ep.profile_ids == ("old",)


@pytest.mark.parametrize("value,message", [
    ("{not json", "not JSON"),
    ("[1]", "not a JSON object"),
    (json.dumps({"ipv4_nets": "10.0.0.1/32"}), "ipv4_nets is not a list"),
    (json.dumps({"ipv6_nets": [5]}), "ipv6_nets holds a non-string 5"),
    (json.dumps({"ipv4_nets": ["10.0.0.300/32"]}), "10.0.0.300"),
])
def test_endpoint_corrupt(value, message):
    with pytest.raises(m.CorruptRecord, match=message):
        m.Endpoint.from_json(m.endpoint("h", "e"), value)


def test_endpoint_not_an_endpoint_key():
    with pytest.raises(m.CorruptRecord):
        m.Endpoint.from_json("/calico/v1/host/h/bird_ip", "{}")


@pytest.mark.parametrize("data,problem", [
    ({"profile_ids": ["p"]}, "no interface name"),
    ({"name": "cali1", "profile_ids": "p"}, "profile_ids is not a list of strings"),
    ({"name": "cali1", "profile_ids": ["p"], "mac": "zz"}, "invalid mac 'zz'"),
    ({"name": "cali1", "profile_ids": ["p"], "ipv4_nets": ["fd00::1/128"]},
     "ipv4_nets holds an IPv6 address 'fd00::1/128'"),
])
def test_endpoint_policy_problems(data, problem):
    assert m.Endpoint.from_json(m.endpoint("h", "e"), json.dumps(data)).policy_problem() \
        == problem


def test_endpoint_join_checks_and_host_routes():
    ep = m.Endpoint.from_json(m.endpoint("h", "e"), json.dumps(
        {"mac": "ee:ee:ee:ee:ee:ee", "mtu": 10, "ipv4_nets": ["10.0.0.0/24"]}))
    with pytest.raises(m.CorruptRecord, match="bad mtu 10"):
        ep.check_join()
    with pytest.raises(m.CorruptRecord, match="is not a host route"):
        ep.host_routes()
    ok = _endpoint(ipv6_nets=("fd00::5/128",))
    ok.check_join()
    assert [str(n) for n in ok.host_routes()] == ["10.0.0.5/32", "fd00::5/128"]


def test_parse_endpoints_skips_and_warns():
    warnings = []
    items = {m.endpoint("h", "a"): _endpoint(endpoint_id="a").to_json(),
             m.endpoint("h", "b"): "garbage",
             m.bird_ip_key("h"): "10.0.0.1"}
    eps = m.parse_endpoints(items, warnings)
    assert [e.endpoint_id for e in eps] == ["a"]
    assert len(warnings) == 1 and "ignoring endpoint" in warnings[0]


# -- rules and profiles -------------------------------------------------------------


def test_default_profile_json():
    prof = m.Profile.default("net1")
    assert prof.to_json() == {
        m.profile_tags("net1"): json.dumps(["net1"]),
        m.profile_rules("net1"): json.dumps({
            "inbound_rules": [{"action": "allow", "src_tag": "net1"}],
            "outbound_rules": [{"action": "allow"}]})}
    back = m.Profile.from_json("net1", prof.tags_json(), prof.rules_json())
    assert back == prof


@pytest.mark.parametrize("rule", [
    {"action": "allow"}, {"action": "deny", "protocol": "tcp", "dst_ports": [80, "1000:2000"]},
    {"action": "next-tier", "src_tag": "web"}, {"protocol": "icmp", "icmp_type": 8},
    {"action": "allow", "src_net": "10.0.0.0/8", "ip_version": 4},
])
def test_valid_rules(rule):
    assert m.validate_rules([rule]) == [rule]


@pytest.mark.parametrize("rule,message", [
    ("allow", "rule is not an object"),
    ({"action": "allow", "colour": "red"}, "unknown rule field"),
    ({"action": "maybe"}, "unknown action"),
    ({"src_net": "10.0.0.0/8", "dst_net": "fd00::/8"}, "mixes IPv4 and IPv6"),
    ({"dst_ports": [80]}, "needs protocol"),
    ({"protocol": "tcp", "dst_ports": [70000]}, "dst_ports"),
    ({"protocol": "bogus"}, "unknown protocol"),
    ({"src_tag": "bad tag"}, "not a valid tag"),
    ({"protocol": "icmp", "icmp_code": 1}, "needs icmp_type"),
    ({"ip_version": 5}, "ip_version must be 4 or 6"),
])
def test_invalid_rules(rule, message):
    with pytest.raises(m.InvalidRule, match=message):
        m.validate_rules([{"action": "allow"}, rule], "inbound rule")
    with pytest.raises(m.InvalidRule, match="inbound rule 1: "):
        m.validate_rules([{"action": "allow"}, rule], "inbound rule")


def test_rules_must_be_a_list():
    with pytest.raises(m.InvalidRule, match="must be a list"):
        m.validate_rules({"action": "allow"})


def test_profile_from_user_validates():
    prof = m.Profile.from_user("web", ["web", "web", "db"], [{"action": "allow"}], [])
    assert prof.tags == ("web", "db")
    with pytest.raises(m.InvalidRule, match="outbound rule 0"):
        m.Profile.from_user("web", [], [], [{"action": "allow", "dst_ports": [1]}])
    with pytest.raises(ValueError, match="invalid profile name"):
        m.Profile.from_user("bad name")
    with pytest.raises(ValueError, match="invalid tag"):
        m.Profile.from_user("ok", ["bad tag"])


def test_profiles_in_a_datastore_are_read_leniently():
    warnings = []
    items = {m.profile_tags("p"): json.dumps(["p", "bad tag"]),
             m.profile_rules("p"): json.dumps({"inbound_rules": [{"action": "maybe"}],
                                               "outbound_rules": "nope"}),
             m.profile_tags("q"): "not json",
             m.profile_labels("r"): "{}",
             m.profile_tags("bad name"): "[]"}
    profiles = m.parse_profiles(items, warnings)
    assert sorted(profiles) == ["p", "q", "r"]
    assert profiles["p"].tags == ("p",)
    assert profiles["p"].inbound == [{"action": "maybe"}]   # kept: the compiler skips it
    assert profiles["p"].outbound == []
    assert profiles["q"].tags == ()
    assert len(warnings) == 4


# -- network records ------------------------------------------------------------------


REQUEST = {"NetworkID": NID, "Options": {"com.docker.network.generic": {"mtu": "1400"}},
           "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "10.1.0.0/24",
                         "Gateway": "10.1.0.1/24"}], "IPv6Data": []}


def test_network_record_json_is_the_request_plus_ours():
    rec = m.NetworkRecord.create(NID, REQUEST, "h1", "", ["10.1.0.0/24"])
    assert rec.to_json() == json.dumps(dict(REQUEST, **{m.META: {
        "host": "h1", "profile": "", "pools": ["10.1.0.0/24"]}}))
    back = m.NetworkRecord.from_json(NID, rec.to_json(), version=7)
    assert back.body == rec.body and back.version == 7 and back.key == m.network(NID)
    assert back.host == "h1" and back.profile == "" and not back.legacy
    assert back.owned_pools() == ["10.1.0.0/24"] and not back.calico_ipam
    assert back.generic_options == {"mtu": "1400"}
    named = back.with_profile("web")
    assert named.profile == "web" and back.profile == ""
    assert list(json.loads(named.to_json())) == list(json.loads(rec.to_json()))


def test_legacy_network_record():
    rec = m.NetworkRecord.from_json(NID, json.dumps(REQUEST))
    assert rec.legacy and rec.profile == NID and rec.host is None
    assert rec.owned_pools() == ["10.1.0.0/24"]


def test_calico_ipam_network_record():
    body = dict(REQUEST, IPv4Data=[{"AddressSpace": m.LOCAL_ADDRESS_SPACE,
                                    "Pool": "0.0.0.0/0", "Gateway": "0.0.0.0/0"}])
    rec = m.NetworkRecord.from_json(NID, json.dumps(body))
    assert rec.calico_ipam and rec.named_pools() == []


@pytest.mark.parametrize("value", ["[]", "nope", '"x"'])
def test_corrupt_network_record(value):
    with pytest.raises(m.CorruptRecord):
        m.NetworkRecord.from_json(NID, value)


# -- IPAM records -------------------------------------------------------------------------


def test_docker_ipam_pool_json():
    assert m.Pool.docker_ipam("10.1.0.0/24", True, True).to_json() == json.dumps(
        {"cidr": "10.1.0.0/24", "ipip": "tunl0", "masquerade": True, "ipam": False})
    assert m.Pool.docker_ipam("fd00::/64", True, False).to_json() == json.dumps(
        {"cidr": "fd00::/64", "ipam": False})


def test_pool_round_trip_and_defaults():
    key = m.pool("10.2.0.0/16")
    pool = m.Pool.from_json(key, json.dumps({"cidr": "10.2.0.0/16", "nat": 1}), 4)
    assert pool.enabled and pool.key == key and pool.state() == "enabled"
    assert json.loads(pool.to_json()) == {"cidr": "10.2.0.0/16", "nat": 1}
    assert m.Pool.from_json(key, "", 4).cidr == ipaddress.ip_network("10.2.0.0/16")
    off = m.Pool.from_json(key, json.dumps({"cidr": "10.2.0.0/16", "disabled": "true"}), 4)
    assert not off.enabled and off.state() == "disabled"
    with pytest.raises(m.CorruptRecord, match="IPv4 CIDR under the IPv6"):
        m.Pool.from_json(key, "{}", 6)
    assert m.Pool.parse(key, "[1]", 4) is None


def test_block_round_trip():
    block = m.Block(ipaddress.ip_network("10.0.0.64/26"), "host:h1")
    ips = block.auto_assign(2, "netplugin.x.y", None)
    assert [str(i) for i in ips] == ["10.0.0.64", "10.0.0.65"]
    back = m.Block.from_json(block.key, block.to_json(), 3)
    assert back.to_json() == block.to_json() and back.version == 3 and back.host == "h1"
    assert back.attributes_of(ips[0]) == {"handle_id": "netplugin.x.y", "secondary": None}
    with pytest.raises(m.AddressInUse):
        back.assign(ips[0], None, None)
    with pytest.raises(m.CorruptData, match="is corrupt"):
        m.Block.from_json(block.key, json.dumps({"cidr": "10.0.0.64/26"}))


def test_handle_and_config():
    handle = m.Handle("h")
    handle.increment("10.0.0.64/26", 2)
    back = m.Handle.from_json("h", handle.to_json(), 1)
    assert back.block == {"10.0.0.64/26": 2} and back.key == m.handle_key("h")
    with pytest.raises(m.CorruptData):
        m.Handle.from_json("h", json.dumps({"block": {"x": "2"}}))
    assert m.IpamConfig.parse("") == m.IpamConfig()
    cfg = m.IpamConfig(auto_allocate_blocks=False, strict_affinity=True)
    assert m.IpamConfig.from_json(cfg.to_json()) == cfg
    assert m.IpamConfig.parse("[") == m.IpamConfig()


# -- the driver writes the datastore layout byte for byte -------------------------


def test_driver_writes_the_same_bytes(tmp_path, monkeypatch):
    from backends.calico import driver
    from netplugin import protocol as p
    from tests.netns_runner import calico_backend
    from tests.unit.test_calico_backend import FakeLinux, create_ep, net_body

    monkeypatch.setattr(driver, "linux", FakeLinux())
    backend, store = calico_backend(str(tmp_path / "state.db"))
    try:
        nid = "3df319d886f3a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f607182930"
        eid = "27d4e97367f0aabbccddeeff00112233445566778899aabbccddeeff00112233"
        body = net_body(nid, generic={"profile": "web", "nat-outgoing": "yes", "mtu": "1400"})
        req = p.CreateNetworkRequest.parse(body)
        backend.create_network(req)
        backend.create_endpoint(create_ep(nid, eid, mac="02:42:ac:11:00:02"))
        raw = {item.key: item.value for item in store.inner.list_prefix("/")}
        assert raw == {
            "/calico/v1/ipam/v4/pool/10.10.0.0-24": json.dumps(
                {"cidr": "10.10.0.0/24", "masquerade": True, "ipam": False}),
            f"/calico/libnetwork/v1/{nid}": json.dumps(dict(req.raw, Netplugin={
                "host": "host-a", "profile": "web", "pools": ["10.10.0.0/24"]})),
            f"/calico/libnetwork/refs/web/host-a/{nid}": json.dumps({"network": nid}),
            "/calico/v1/policy/profile/web/tags": json.dumps(["web"]),
            "/calico/v1/policy/profile/web/rules": json.dumps({
                "inbound_rules": [{"action": "allow", "src_tag": "web"}],
                "outbound_rules": [{"action": "allow"}]}),
            m.endpoint("host-a", eid): json.dumps({
                "state": "active", "name": m.host_veth_name(eid), "mac": "02:42:ac:11:00:02",
                "profile_ids": ["web"], "labels": {}, "ipv4_nets": ["10.10.0.5/32"],
                "ipv6_nets": [], "mtu": 1400, "network_id": nid}),
        }
    finally:
        store.close()


def test_validation_agrees_with_the_compiler():
    from backends.calico import policy
    rules = [{"action": "allow"}, {"action": "deny", "protocol": "udp", "!dst_ports": [53]},
             {"protocol": 300}, {"src_net": "10.0.0.0/33"}, {"action": "allow", "x": 1},
             {"protocol": "icmpv6", "icmp_type": 128, "icmp_code": 0},
             {"protocol": "tcp", "src_ports": []}, {"ip_version": 6, "src_tag": "a"},
             {"protocol": "icmp", "dst_net": "fd00::/8"}, None, {"!protocol": "tcp"}]
    for rule in rules:
        try:
            policy.compile_rule(rule)
            compiled = True
        except m.InvalidRule:
            compiled = False
        try:
            m.validate_rules([rule])
            valid = True
        except m.InvalidRule:
            valid = False
        assert compiled == valid, rule
