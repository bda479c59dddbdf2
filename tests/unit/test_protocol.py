"""Request validation: typed objects out, clear InvalidRequest for bad input."""
import base64

import pytest

from netplugin import protocol as p
from netplugin.errors import InvalidRequest

NID = "3df319d886f3" + "0" * 52
EID = "a" * 64


def test_create_network_parses_docker_body():
    req = p.CreateNetworkRequest.parse({
        "NetworkID": NID,
        "Options": {"com.docker.network.enable_ipv6": False,
                    "com.docker.network.generic": {"ipip": "false"}},
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "192.168.0.0/24",
                      "Gateway": "192.168.0.1/24", "AuxAddresses": None}],
        "IPv6Data": []})
    assert req.network_id == NID
    assert req.generic_options == {"ipip": "false"}
    assert req.ipv4_data[0].pool == "192.168.0.0/24"
    assert req.ipv4_data[0].gateway == "192.168.0.1/24"
    assert not req.enable_ipv6


@pytest.mark.parametrize("body, needle", [
    (None, "NetworkID is required"),
    ([], "must be a JSON object"),
    ({"NetworkID": 5}, "NetworkID must be a string"),
    ({"NetworkID": "../../etc"}, "not a valid ID"),
    ({"NetworkID": NID, "IPv4Data": {}}, "IPv4Data must be a list"),
    ({"NetworkID": NID, "IPv4Data": [{"Pool": "300.1.1.0/24"}]}, "not a valid CIDR"),
    ({"NetworkID": NID, "IPv4Data": [{"Pool": "fd00::/64"}]}, "must be an IPv4 CIDR"),
    ({"NetworkID": NID, "Options": {"com.docker.network.generic": {"mtu": 1400}}},
     "'mtu' must be a string"),
    ({"NetworkID": NID, "Options": "x"}, "Options must be an object"),
])
def test_create_network_rejects(body, needle):
    with pytest.raises(InvalidRequest) as exc:
        p.CreateNetworkRequest.parse(body)
    assert needle in str(exc.value)


def test_create_endpoint_and_mac_option():
    mac = base64.b64encode(bytes([0x02, 0x42, 0xac, 0x11, 0, 2])).decode()
    req = p.CreateEndpointRequest.parse({
        "NetworkID": NID, "EndpointID": EID,
        "Interface": {"Address": "192.168.0.2/24", "AddressIPv6": "", "MacAddress": ""},
        "Options": {"com.docker.network.endpoint.macaddress": mac}})
    assert req.interface.address == "192.168.0.2/24"
    assert req.mac_option == "02:42:ac:11:00:02"


@pytest.mark.parametrize("iface, needle", [
    ({"Address": "192.168.0.2"}, "prefix length"),
    ({"Address": "fd00::2/64"}, "IPv4"),
    ({"AddressIPv6": "10.0.0.1/24"}, "IPv6"),
    ({"MacAddress": "zz:zz"}, "not a valid MAC"),
    ("eth0", "Interface must be an object"),
])
def test_create_endpoint_rejects(iface, needle):
    with pytest.raises(InvalidRequest) as exc:
        p.CreateEndpointRequest.parse({"NetworkID": NID, "EndpointID": EID, "Interface": iface})
    assert needle in str(exc.value)


def test_bad_mac_option():
    with pytest.raises(InvalidRequest):
        p.CreateEndpointRequest.parse({"NetworkID": NID, "EndpointID": EID,
                                       "Options": {p.MAC_OPTION: "!!"}})


def test_join_requires_sandbox():
    with pytest.raises(InvalidRequest) as exc:
        p.JoinRequest.parse({"NetworkID": NID, "EndpointID": EID})
    assert "SandboxKey is required" in str(exc.value)


def test_ipam_requests():
    req = p.RequestAddressRequest.parse({"PoolID": "CalicoPoolIPv4", "Address": "",
                                         "Options": None})
    assert req.address == "" and req.options == {} and not req.is_gateway
    gw = p.RequestAddressRequest.parse({"PoolID": "x", "Options": {
        "RequestAddressType": "com.docker.network.gateway"}})
    assert gw.is_gateway
    with pytest.raises(InvalidRequest):
        p.RequestAddressRequest.parse({"PoolID": "x", "Address": "1.2.3"})
    with pytest.raises(InvalidRequest):
        p.RequestPoolRequest.parse({"Pool": "10.0.0.0/8", "V6": "yes"})
    with pytest.raises(InvalidRequest):
        p.RequestPoolRequest.parse({"Pool": "10.0.0.0/8", "V6": True})
    assert p.ReleaseAddressRequest.parse({"PoolID": "x", "Address": "0.0.0.0"}).address == "0.0.0.0"


def test_responses_serialise():
    join = p.JoinResponse("tmpabc", "eth", gateway="169.254.1.1",
                          static_routes=(p.StaticRoute("169.254.1.1/32", 1),),
                          disable_gateway_service=True)
    assert join.to_json() == {
        "InterfaceName": {"SrcName": "tmpabc", "DstPrefix": "eth"},
        "Gateway": "169.254.1.1",
        "StaticRoutes": [{"Destination": "169.254.1.1/32", "RouteType": 1, "NextHop": ""}],
        "DisableGatewayService": True}
    assert p.CreateEndpointResponse().to_json() == {}
    assert p.CreateEndpointResponse(mac_address="ee:ee:ee:ee:ee:ee").to_json() == {
        "Interface": {"MacAddress": "ee:ee:ee:ee:ee:ee"}}


# -- field bounds ---------------------------------------------------------------


@pytest.mark.parametrize("parse, body, match", [
    (p.NetworkRequest.parse, {"NetworkID": "a" * 65}, "NetworkID is not a valid ID"),
    (p.NetworkRequest.parse, {"NetworkID": "a" * 5000}, "NetworkID is too long"),
    (p.JoinRequest.parse, {"NetworkID": "n", "EndpointID": "e", "SandboxKey": "/" * 5000},
     "SandboxKey is too long"),
    (p.ReleasePoolRequest.parse, {"PoolID": "x" * 300}, "PoolID is too long"),
    (p.RequestAddressRequest.parse, {"PoolID": "P", "Options": {"k": "v" * 5000}},
     r"Options\['k'\] is too long"),
    (p.RequestAddressRequest.parse, {"PoolID": "P", "Options": {"k" * 300: "v"}},
     "has a key of 300 characters"),
    (p.RequestPoolRequest.parse, {"Options": {str(i): "v" for i in range(300)}},
     "too many entries"),
    (p.CreateEndpointRequest.parse,
     {"NetworkID": "n", "EndpointID": "e", "Options": {"a": [[[[[[[[[["x"]]]]]]]]]]}},
     "nested too deeply"),
    (p.DiscoveryRequest.parse, {"DiscoveryType": 1, "DiscoveryData": ["x"] * 1000},
     "DiscoveryData has too many entries"),
    (p.CreateNetworkRequest.parse,
     {"NetworkID": "n", "IPv4Data": [{"Pool": "10.0.0.0/24"}] * 300}, "IPv4Data has too many"),
])
def test_every_field_is_bounded(parse, body, match):
    with pytest.raises(InvalidRequest, match=match):
        parse(body)


def test_docker_sized_fields_pass():
    hexid = "0123456789abcdef" * 4
    req = p.JoinRequest.parse({"NetworkID": hexid, "EndpointID": hexid,
                               "SandboxKey": "/var/run/docker/netns/" + "a" * 12,
                               "Options": {"com.docker.network.portmap": []}})
    assert req.endpoint_id == hexid
