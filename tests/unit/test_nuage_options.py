"""Nuage network options, records, names and the resolution check (no I/O)."""
import json

import pytest

from backends.nuage import network as nw
from backends.nuage.network import NuageNetwork, network_from_request, parse_network_options
from backends.nuage.vport import (EndpointRecord, Resolution, VPort, generated_mac,
                                  peer_name, port_name)
from netplugin import protocol as p
from netplugin.errors import InvalidRequest, NotSupported, PluginError

NID = "3df319d886f3a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f607182930"
EID = "27d4e97367f0aabbccddeeff00112233445566778899aabbccddeeff00112233"
GOOD = {"organization": "Enterprise", "domain": "Domain", "zone": "Zone",
        "subnet": "Subnet 2", "user": "admin"}


def create_req(generic=None, pool="10.21.59.0/24", gateway="10.21.59.1/24", pool6=None,
               extra_pool=None):
    ipv4 = [{"AddressSpace": "LocalDefault", "Pool": pool, "Gateway": gateway}] if pool else []
    if extra_pool:
        ipv4.append({"AddressSpace": "LocalDefault", "Pool": extra_pool, "Gateway": ""})
    return p.CreateNetworkRequest.parse({
        "NetworkID": NID,
        "Options": {"com.docker.network.enable_ipv6": bool(pool6),
                    "com.docker.network.generic": dict(GOOD if generic is None else generic)},
        "IPv4Data": ipv4,
        "IPv6Data": [{"AddressSpace": "LocalDefault", "Pool": pool6,
                      "Gateway": "fd00::1/64"}] if pool6 else []})


def test_the_seed_example_is_accepted():
    assert parse_network_options(GOOD) == GOOD
    net = network_from_request(create_req())
    assert (net.organization, net.domain, net.zone, net.subnet, net.user) == \
        ("Enterprise", "Domain", "Zone", "Subnet 2", "admin")
    assert (net.pool, net.gateway) == ("10.21.59.0/24", "10.21.59.1")
    assert net.options == GOOD


@pytest.mark.parametrize("missing", nw.REQUIRED_OPTIONS)
def test_each_missing_option_is_named(missing):
    opts = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(InvalidRequest) as exc:
        parse_network_options(opts)
    msg = str(exc.value)
    assert f"missing nuage network option {missing}:" in msg
    assert "-o organization=<enterprise>" in msg   # says how to do it right


@pytest.mark.parametrize("empty", nw.REQUIRED_OPTIONS)
def test_each_empty_option_is_named(empty):
    opts = dict(GOOD, **{empty: "  "})
    with pytest.raises(InvalidRequest, match=f"empty nuage network option {empty}:"):
        parse_network_options(opts)


def test_all_problems_at_once():
    with pytest.raises(InvalidRequest) as exc:
        parse_network_options({"organization": "E", "domain": ""})
    msg = str(exc.value)
    assert "missing nuage network options zone, subnet, user" in msg
    assert "empty nuage network option domain" in msg


def test_no_options_at_all_is_refused():
    """The seed accepted a network without -o (empty Nuage fields); we do not."""
    with pytest.raises(InvalidRequest, match="organization, domain, zone, subnet, user"):
        network_from_request(create_req(generic={}))


def test_unknown_options_refused_docker_options_passed():
    with pytest.raises(InvalidRequest, match=r"unknown nuage network option 'colour'.*"
                                             r"organization, domain, zone, subnet, user"):
        parse_network_options(dict(GOOD, colour="blue"))
    assert parse_network_options(dict(GOOD, **{"com.docker.network.driver.mtu": "1450"})) \
        == GOOD


def test_values_are_stripped():
    assert parse_network_options(dict(GOOD, subnet=" Subnet 2 "))["subnet"] == "Subnet 2"


@pytest.mark.parametrize("kw, err, words", [
    ({"pool": None}, InvalidRequest, "--subnet"),
    ({"pool6": "fd00::/64"}, NotSupported, "IPv4 only"),
    ({"extra_pool": "10.21.60.0/24"}, InvalidRequest, "one IPv4 subnet"),
    ({"pool": "0.0.0.0/0", "gateway": "0.0.0.0/0"}, NotSupported, "real subnet"),
])
def test_ipam_data_is_checked(kw, err, words):
    with pytest.raises(err, match=words):
        network_from_request(create_req(**kw))


def test_options_are_checked_before_ipam():
    with pytest.raises(InvalidRequest, match="missing nuage network option user"):
        network_from_request(create_req(generic={k: v for k, v in GOOD.items()
                                                 if k != "user"}, pool=None))


def test_network_record_roundtrip_and_corruption():
    net = network_from_request(create_req())
    assert NuageNetwork.from_json("k", net.to_json()) == net
    for raw in ("nope", "[]", json.dumps({"network_id": NID}),
                json.dumps(dict(json.loads(net.to_json()), pool="x"))):
        with pytest.raises(PluginError, match="network record k is corrupt"):
            NuageNetwork.from_json("k", raw)


def test_interface_names():
    assert port_name(EID) == "nuv27d4e97367f0"
    assert peer_name(EID) == "nut27d4e97367f0"
    assert len(port_name(EID)) == 15
    odd = port_name("my-endpoint")          # not hex: hashed, still 15 chars
    assert odd.startswith("nuv") and len(odd) == 15 and odd == port_name("my-endpoint")
    assert port_name("my-endpoint") != port_name("my-endpoint2")


def test_generated_mac_is_deterministic_and_local():
    mac = generated_mac(EID)
    assert mac == generated_mac(EID) and mac != generated_mac(EID[::-1])
    assert mac.startswith("7a:42:") and len(mac.split(":")) == 6
    assert int(mac[:2], 16) & 0x02 and not int(mac[:2], 16) & 0x01  # local, unicast


def test_endpoint_record_roundtrip_and_corruption():
    rec = EndpointRecord.new(NID, EID, "10.21.59.5/24", "7A:42:00:00:00:01", False)
    assert rec.mac == "7a:42:00:00:00:01" and rec.ip == "10.21.59.5" and rec.prefixlen == 24
    assert EndpointRecord.from_json("k", rec.to_json()) == rec
    with pytest.raises(PluginError, match="endpoint record k is corrupt"):
        EndpointRecord.from_json("k", json.dumps({"network_id": NID}))
    with pytest.raises(PluginError, match="corrupt"):
        EndpointRecord.from_json("k", json.dumps(dict(json.loads(rec.to_json()),
                                                      address="bogus")))


def test_vport_rows_without_docker_identity_fall_back_to_the_endpoint():
    net = network_from_request(create_req())
    rec = EndpointRecord.new(NID, EID, "10.21.59.5/24", "7a:42:00:00:00:01", False)
    vp = VPort.of(rec, net, "alubr0")
    assert (vp.vm_uuid, vp.vm_name) == (EID, EID[:12])
    rec.vm_uuid, rec.vm_name = "c" * 64, "web"
    vp = VPort.of(rec, net, "alubr0")
    assert vp.external_ids() == {"vm-uuid": "c" * 64, "vm-name": "web",
                                 "netplugin-endpoint": EID, "netplugin-network": NID,
                                 "netplugin-driver": "nuage"}
    assert vp.port_columns()["metadata"]["static-ip"] == "10.21.59.5"
    assert vp.vm_columns()["nuage_enterprise"] == "Enterprise"


def test_resolution():
    assert Resolution.from_row("", "", "") is None
    assert Resolution.from_row("0.0.0.0", "255.255.255.0", "10.0.0.1") is None
    assert Resolution.from_row("10.0.0.5", "", "10.0.0.1") is None
    res = Resolution.from_row("10.21.59.5", "255.255.255.0", "10.21.59.1", 1, 2)
    assert res.prefixlen == 24
    rec = EndpointRecord.new(NID, EID, "10.21.59.5/24", "7a:42:00:00:00:01", False)
    res.check(rec)
    with pytest.raises(PluginError, match=r"resolved vPort nuv27d4e97367f0 to 10\.21\.59\.9/24,"
                                          r" but Docker's IPAM gave the container "
                                          r"10\.21\.59\.5/24"):
        Resolution("10.21.59.9", "255.255.255.0", "10.21.59.1").check(rec)
    with pytest.raises(PluginError, match="/16"):
        Resolution("10.21.59.5", "255.255.0.0", "10.21.59.1").check(rec)
    with pytest.raises(PluginError, match="garbage"):
        Resolution("10.21.59.5", "255.0.255.0", "10.21.59.1").check(rec)
