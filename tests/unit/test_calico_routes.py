"""Cross-host routes (backends/calico/routes.py): the desired set (pure), and
programming it with netlink inside a throwaway network namespace."""
import json

import pytest

from backends.calico import routes
from netplugin.config import config_from_text
from netplugin.errors import ConfigError
from tests.netns_runner import netns_unavailable_reason, run_in_netns

EP = "/calico/v1/host/{h}/workload/libnetwork/libnetwork/endpoint/{e}"
AFF = "/calico/ipam/v2/host/{h}/ipv4/block/{c}"


def bird(h, ip):
    return (f"/calico/v1/host/{h}/bird_ip", ip)


def ep(h, e, *nets, v6=()):
    return (EP.format(h=h, e=e), json.dumps({"state": "active", "name": "cali" + e,
                                             "ipv4_nets": list(nets),
                                             "ipv6_nets": list(v6)}))


def aff(h, cidr):
    return (AFF.format(h=h, c=cidr.replace("/", "-")), "")


def test_remote_blocks_routed_via_their_host_never_our_own():
    hosts = [bird("a", "10.99.0.11"), bird("b", "10.99.0.12"), bird("c", "10.99.0.13")]
    affs = [aff("a", "192.168.0.0/26"), aff("b", "192.168.0.64/26"),
            aff("b", "192.168.1.0/26"), aff("c", "192.168.2.0/26")]
    assert routes.desired_routes("a", hosts, affs, "10.99.0.11") == {
        "192.168.0.64/26": "10.99.0.12", "192.168.1.0/26": "10.99.0.12",
        "192.168.2.0/26": "10.99.0.13"}


def test_endpoints_outside_their_hosts_blocks_get_a_host_route():
    hosts = [bird("a", "10.99.0.11"), bird("b", "10.99.0.12"),
             ep("a", "e1", "192.168.0.1/32"),                  # local
             ep("b", "e2", "192.168.0.65/32"),                 # in b's block: covered
             ep("b", "e3", "192.168.0.2/32"),                  # borrowed from a's block
             ep("b", "e4", "10.10.0.5/32", v6=["fd00::5/128"]),  # Docker IPAM (v6 ignored)
             ep("b", "e5", "192.168.0.1/32")]                  # clash with a local one
    affs = [aff("a", "192.168.0.0/26"), aff("b", "192.168.0.64/26")]
    assert routes.desired_routes("a", hosts, affs) == {
        "192.168.0.64/26": "10.99.0.12", "192.168.0.2/32": "10.99.0.12",
        "10.10.0.5/32": "10.99.0.12"}


def test_hosts_without_bird_ip_or_with_ours_and_garbage_are_skipped():
    hosts = [bird("b", "not-an-ip"), ep("b", "e1", "10.10.0.5/32"),
             bird("c", "10.99.0.11"), ep("c", "e2", "10.10.0.6/32"),
             ("/calico/v1/host/d/workload/libnetwork/libnetwork/endpoint/x", "{garbage"),
             bird("d", "10.99.0.14"), ep("d", "e3", "10.10.0.7/32"),
             ("/calico/v1/host/d/config/marker", "created")]
    affs = [("/calico/ipam/v2/host/d/ipv4/block/nonsense", ""),
            aff("e", "192.168.3.0/26")]                      # e: no bird_ip
    assert routes.desired_routes("a", hosts, affs, own_ip="10.99.0.11") == {
        "10.10.0.7/32": "10.99.0.14"}


def test_same_destination_claimed_twice_goes_to_first_host():
    hosts = [bird("b", "10.99.0.12"), bird("c", "10.99.0.13")]
    affs = [aff("c", "192.168.0.0/26"), aff("b", "192.168.0.0/26")]
    assert routes.desired_routes("a", hosts, affs) == {"192.168.0.0/26": "10.99.0.12"}


def test_relevant_keys():
    assert routes.relevant_key(bird("x", "1.2.3.4")[0])
    assert routes.relevant_key(ep("x", "e")[0])
    assert routes.relevant_key(aff("x", "10.0.0.0/26")[0])
    assert not routes.relevant_key("/calico/v1/host/x/config/marker")
    assert routes.relevant_key("/calico/ipam/v2/host/x/ipv6/block/fd00::-122")
    assert routes.relevant_key("/calico/v1/host/x/bird6_ip")


def bird6(h, ip):
    return (f"/calico/v1/host/{h}/bird6_ip", ip)


def aff6(h, cidr):
    return (f"/calico/ipam/v2/host/{h}/ipv6/block/{cidr.replace('/', '-')}", "")


def test_ipv6_blocks_and_endpoints_routed_via_bird6_ip():
    hosts = [bird("a", "10.99.0.11"), bird6("a", "fd99::11"),
             bird("b", "10.99.0.12"), bird6("b", "fd99::12"),
             bird("c", "10.99.0.13"),                               # no IPv6 next hop
             ep("b", "e1", "192.168.0.65/32", v6=["fd80::45/128"]),  # in b's blocks
             ep("b", "e2", "10.10.0.5/32", v6=["fd00:77::5/128"]),   # Docker IPAM
             ep("c", "e3", "10.10.0.6/32", v6=["fd00:77::6/128"])]
    affs = [aff("b", "192.168.0.64/26"), aff6("a", "fd80::/122"), aff6("b", "fd80::40/122"),
            aff6("c", "fd80::80/122")]
    assert routes.desired_routes("a", hosts, affs, "10.99.0.11", "fd99::11") == {
        "192.168.0.64/26": "10.99.0.12", "fd80::40/122": "fd99::12",
        "10.10.0.5/32": "10.99.0.12", "fd00:77::5/128": "fd99::12",
        "10.10.0.6/32": "10.99.0.13"}


def test_only_host_routes_and_block_sized_prefixes_from_the_datastore():
    hosts = [bird("b", "10.99.0.12"), bird6("b", "fe80::1"),        # link-local: refused
             ep("b", "e1", "0.0.0.0/1"), ep("b", "e2", "10.10.0.0/24"),
             ep("b", "e3", "10.10.0.7/32"), ep("b", "e4", v6=["fd00::/64"])]
    affs = [aff("b", "0.0.0.0/1"), aff("b", "192.168.0.0/24"), aff("b", "192.168.1.0/26"),
            aff6("b", "fd80::/64"), ("/calico/ipam/v2/host/b/ipv6/block/10.0.0.0-26", "")]
    assert routes.desired_routes("a", hosts, affs) == {
        "192.168.1.0/26": "10.99.0.12", "10.10.0.7/32": "10.99.0.12"}


def test_config_ip_key():
    assert config_from_text("[calico]\n").calico.ip == ""
    assert config_from_text('[calico]\nip = " 10.99.0.11 "\n').calico.ip == "10.99.0.11"
    with pytest.raises(ConfigError, match="calico.ip"):
        config_from_text('[calico]\nip = "10.99.0.300"\n')


# --------------------------------------------------------------------------
# real netlink, in a throwaway network namespace

needs_netns = pytest.mark.skipif(netns_unavailable_reason() is not None,
                                 reason=str(netns_unavailable_reason()))

_SETUP = """
import subprocess
def sh(cmd):
    subprocess.run(cmd, shell=True, check=True)
sh("ip link add eth0 type veth peer name peer0 && ip link set peer0 up && "
   "ip link set eth0 up && ip addr add 10.99.0.11/24 dev eth0 && "
   "ip route add default dev eth0")
def ours():
    return {r["dst"]: r.get("gateway") for r in routes(None) if r.get("protocol") == "78"}
"""


@needs_netns
def test_apply_routes_only_touches_its_own_protocol():
    out = run_in_netns(_SETUP + """
from backends.calico.routes import apply_routes, detect_host_ip
sh("ip route add 192.168.9.0/24 via 10.99.0.13")          # somebody else's
sh("ip route add 192.168.8.0/24 via 10.99.0.13 proto 79")  # another daemon's
r1 = apply_routes({"192.168.5.0/26": "10.99.0.12", "192.168.9.0/24": "10.99.0.12",
                   "192.168.7.7/32": "10.99.0.14"})
s1 = ours()
r2 = apply_routes({"192.168.5.0/26": "10.99.0.13"})
s2 = ours()
r3 = apply_routes({"192.168.5.0/26": "10.99.0.13"})
r4 = apply_routes({})
all_routes = {r["dst"]: r.get("gateway") for r in routes(None)}
sh("ip -6 addr add fd99::11/64 dev eth0 nodad")
from backends.calico.routes import detect_host_ip6
r6 = apply_routes({"fd80::40/122": "fd99::12", "fd00:77::5/128": "fd99::12"})
import subprocess
s6 = subprocess.run("ip -6 route show proto 78", shell=True, capture_output=True,
                    text=True).stdout
r7 = apply_routes({})
s7 = subprocess.run("ip -6 route show proto 78", shell=True, capture_output=True,
                    text=True).stdout
emit({"ip": detect_host_ip(), "r1": r1, "s1": s1, "r2": r2, "s2": s2, "r3": r3,
      "r4": r4, "s4": ours(), "all": all_routes, "ip6": detect_host_ip6(), "r6": r6,
      "s6": s6, "r7": r7, "s7": s7})
""")
    assert out["ip6"] == "fd99::11"
    assert out["r6"]["added"] == ["fd00:77::5/128", "fd80::40/122"], out["r6"]
    assert "fd80::40/122 via fd99::12" in out["s6"] and "fd00:77::5 via fd99::12" in out["s6"]
    assert out["r7"]["deleted"] == ["fd00:77::5/128", "fd80::40/122"] and not out["s7"].strip()
    assert out["ip"] == "10.99.0.11"
    assert out["r1"]["added"] == ["192.168.5.0/26", "192.168.7.7/32"]
    assert out["r1"]["skipped"] == ["192.168.9.0/24"]
    assert out["s1"] == {"192.168.5.0/26": "10.99.0.12", "192.168.7.7": "10.99.0.14"}
    assert out["r2"]["replaced"] == ["192.168.5.0/26"]
    assert out["r2"]["deleted"] == ["192.168.7.7/32"]
    assert out["s2"] == {"192.168.5.0/26": "10.99.0.13"}
    assert not any(out["r3"].values())
    assert out["r4"]["deleted"] == ["192.168.5.0/26"] and out["s4"] == {}
    assert out["all"]["192.168.9.0/24"] == "10.99.0.13"
    assert out["all"]["192.168.8.0/24"] == "10.99.0.13"


@needs_netns
def test_route_agent_follows_the_datastore(tmp_path):
    out = run_in_netns(_SETUP + f"""
import json, threading, time
from netplugin.datastore.embedded import EmbeddedDatastore
from backends.calico.routes import RouteAgent
store = EmbeddedDatastore({str(tmp_path / "state.db")!r})
def wait(fn, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if fn():
            return True
        time.sleep(0.05)
    return False
EP = "/calico/v1/host/b/workload/libnetwork/libnetwork/endpoint/e1"
agent = RouteAgent(store, "a", "", resync_interval=60)
stop = threading.Event()
t = threading.Thread(target=agent.run, args=(stop,), daemon=True)
t.start()
res = {{}}
res["bird"] = wait(lambda: any(i.key == "/calico/v1/host/a/bird_ip" and
                               i.value == "10.99.0.11" for i in store.list_prefix("/calico")))
store.put("/calico/ipam/v2/host/a/ipv4/block/192.168.0.0-26", "")
store.put("/calico/v1/host/b/bird_ip", "10.99.0.12")
store.put("/calico/ipam/v2/host/b/ipv4/block/192.168.0.64-26", "")
store.put(EP, json.dumps({{"ipv4_nets": ["10.10.0.5/32"]}}))
want = {{"192.168.0.64/26": "10.99.0.12", "10.10.0.5": "10.99.0.12"}}
res["up"] = wait(lambda: ours() == want)
store.delete(EP)
store.delete("/calico/ipam/v2/host/b/ipv4/block/192.168.0.64-26")
res["down"] = wait(lambda: ours() == {{}})
sh("ip route add 192.168.0.64/26 via 10.99.0.14 proto 78")   # a stray one of ours
store.put("/calico/v1/host/b/bird_ip", "10.99.0.12")          # any event: reconcile
res["stray"] = wait(lambda: ours() == {{}})
stop.set()
t.join(10)
res["stopped"] = not t.is_alive()
res["syncs"] = agent.syncs
emit(res)
""")
    assert out["bird"] and out["up"] and out["down"] and out["stray"] and out["stopped"], out
