"""Which IPv6 proxy neighbour entries the agent keeps (backends/calico/ndp.py)."""
import json

from backends.calico.ndp import desired_entries


def ep_key(host, eid):
    return f"/calico/v1/host/{host}/workload/libnetwork/libnetwork/endpoint/{eid}"


def ep(name, v6, v4=()):
    return json.dumps({"name": name, "ipv6_nets": list(v6), "ipv4_nets": list(v4),
                       "profile_ids": ["n"], "mac": "ee:ee:ee:ee:ee:ee", "state": "active"})


def test_each_local_ipv6_veth_proxies_every_other_address():
    hosts = {
        ep_key("h1", "a"): ep("calia", ["fd00::2/128"]),
        ep_key("h1", "b"): ep("calib", ["fd00::3/128"]),
        ep_key("h1", "c"): ep("calic", [], ["10.0.0.4/32"]),     # IPv4 only
        ep_key("h2", "d"): ep("calid", ["fd00::5/128"]),         # another host
        "/calico/v1/host/h1/bird_ip": "10.99.0.11",
        ep_key("h1", "bad"): "{not json",
    }
    assert desired_entries(hosts, "h1") == {
        ("calia", "fd00::3"), ("calia", "fd00::5"),
        ("calib", "fd00::2"), ("calib", "fd00::5")}
    assert desired_entries(hosts, "h2") == {("calid", "fd00::2"), ("calid", "fd00::3")}
    assert desired_entries({}, "h1") == set()
