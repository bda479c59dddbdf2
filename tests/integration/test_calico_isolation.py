"""Calico network isolation, really enforced: real dockerd in a lab host, the
real plugin (./plugin, whose agent programs nftables from the profiles in the
lab's etcd), busybox containers pinging and connecting with ``nc``.

Containers of one network reach each other; containers of different networks
do not, in either direction; editing a profile's rules in etcd opens and
closes paths within seconds; chains follow containers as they come and go.
Nothing here runs in the machine's own network namespace."""
import json
import signal
import time

import pytest

from tests.plugin_proc import PluginProcess, etcd_config, etcd_items, store

pytestmark = pytest.mark.integration


TABLE = ("inet", "netplugin_calico")
FIXED_CHAINS = {"forward", "input", "from-wl", "to-wl", "from-wl-host"}
OPEN_WITHIN = 10.0    # seconds a profile edit may take to reach the data path
                      # (a correctness bound, not a speed target: it includes docker exec)
PORT = 8080

def rules_key(profile):
    return f"/calico/v1/policy/profile/{profile}/rules"


def profiles_of(host, url, network):
    """The profile_ids of every endpoint record of ``network``'s containers on
    ``host`` (the profile is the Docker network's name, not its ID)."""
    nid = network_id(host, network)
    eps = [json.loads(v) for k, v in etcd_items(
        host, url, f"/calico/v1/host/{host.name}/workload/").items()]
    return [e["profile_ids"] for e in eps if e.get("network_id") == nid]


def wait_for(fn, timeout, interval=0.1):
    """Poll ``fn`` until true; return the seconds it took, or None on timeout."""
    start = time.monotonic()
    while True:
        if fn():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(interval)


def net_info(host, container, network):
    out = host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container).stdout
    return json.loads(out)[network]


def network_id(host, name):
    return host.docker("network", "inspect", "-f", "{{.Id}}", name).stdout.strip()


def ping(host, container, ip, timeout=1):
    r = host.docker("exec", container, "ping", "-c1", f"-W{timeout}", ip, check=False)
    return r.returncode == 0


def listen(host, container):
    """A TCP server on PORT appending what it receives to /tmp/got; returns
    once it listens."""
    host.docker("exec", "-d", container, "sh", "-c",
                f"while true; do nc -l -p {PORT} >> /tmp/got; done")
    assert wait_for(lambda: f":{PORT} " in host.docker(
        "exec", container, "netstat", "-ltn", check=False).stdout, 10) is not None


def tcp(host, client, server, ip):
    """Connect from ``client`` to ``server``'s listener at ``ip``; True when a
    connection delivered our token to the server.

    The server is a loop of one-shot ``nc -l``: a connection racing with its
    restart is refused, or accepted by the exiting listener and lost; both are
    retried.  A path the policy blocks never connects (the policy drops, it
    never rejects): nc times out, and that is the answer, decided on nc's own
    result and message rather than on timing."""
    for _ in range(8):
        token = f"hello-{client}-{time.monotonic_ns()}"
        r = host.docker("exec", client, "sh", "-c",
                        f"echo {token} | nc -w 2 {ip} {PORT} 2>&1", check=False)
        if r.returncode != 0 and "refused" not in (r.stdout + r.stderr).lower():
            return False
        if r.returncode == 0:
            for _ in range(20):
                if token in host.docker("exec", server, "cat", "/tmp/got",
                                        check=False).stdout:
                    return True
                time.sleep(0.05)
        time.sleep(0.2)
    return False


def chains(host):
    out = host.run("nft", "-j", "list", "table", *TABLE, check=False)
    if out.returncode != 0:
        return None
    return {o["chain"]["name"] for o in json.loads(out.stdout)["nftables"] if "chain" in o}


def sets(host):
    out = host.run("nft", "-j", "list", "table", *TABLE).stdout
    return {o["set"]["name"]: o["set"].get("elem", [])
            for o in json.loads(out)["nftables"] if "set" in o}


def endpoint_chains(host):
    return (chains(host) or set()) - FIXED_CHAINS


def veth(host, container, network):
    return "cali" + net_info(host, container, network)["EndpointID"][:11]


@pytest.fixture(scope="module")
def host(make_host):
    return make_host("iso")


@pytest.fixture(scope="module")
def plugin(host, etcd_url):
    proc = PluginProcess(host, etcd_config(etcd_url, host.name))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def env(host, plugin, etcd_url):
    """net1 = {a1, a2}, net2 = {b1}; every container listens on PORT."""
    d = host.docker
    d("network", "create", "--driver=calico", "--subnet=192.168.10.0/24", "net1")
    d("network", "create", "--driver=calico", "--subnet=192.168.11.0/24", "net2")
    names = {"a1": "net1", "a2": "net1", "b1": "net2"}
    try:
        for name, net in names.items():
            d("run", "-d", "--net", net, "--name", name, "busybox", "sleep", "1d")
            listen(host, name)
        # The Calico profile (and tag) of a network is its Docker name.
        env = {"ip": {n: net_info(host, n, net)["IPAddress"] for n, net in names.items()},
               "profile": {net: net for net in ("net1", "net2")},
               "host": host, "url": etcd_url}
        assert profiles_of(host, etcd_url, "net1") == [["net1"], ["net1"]]
        assert profiles_of(host, etcd_url, "net2") == [["net2"]]
        env["default_rules"] = {p: store(host, etcd_url, "get", rules_key(p)).strip()
                                for p in env["profile"].values()}
        for net in ("net1", "net2"):     # nothing is named after the per-host ID
            assert not etcd_items(host, etcd_url, "/calico/v1/policy/profile/"
                                  + network_id(host, net))
        yield env
    finally:
        d("rm", "-f", *names, "x1", "x2", "y1", "tmpc", check=False)
        d("network", "rm", "net1", "net2", "net6a", "net6b", check=False)


def test_same_network_reachable(env):
    h, ip = env["host"], env["ip"]
    assert ping(h, "a1", ip["a2"]) and ping(h, "a2", ip["a1"])
    assert tcp(h, "a1", "a2", ip["a2"]) and tcp(h, "a2", "a1", ip["a1"])


def test_other_network_unreachable_both_ways(env):
    h, ip = env["host"], env["ip"]
    assert not ping(h, "a1", ip["b1"])
    assert not ping(h, "b1", ip["a1"])
    assert not tcp(h, "a1", "b1", ip["b1"])
    assert not tcp(h, "b1", "a1", ip["a1"])
    # the table really is ours: per-endpoint chains and one set per tag
    want = {f"{d}-{veth(h, c, n)}" for c, n in (("a1", "net1"), ("a2", "net1"),
                                                 ("b1", "net2")) for d in ("from", "to")}
    assert endpoint_chains(h) == want
    s = sets(h)
    assert sorted(s[f"t4-{env['profile']['net1']}"]) == sorted([ip["a1"], ip["a2"]])
    assert s[f"t4-{env['profile']['net2']}"] == [ip["b1"]]


def test_profile_edit_opens_and_closes_a_path(env):
    h, ip, url = env["host"], env["ip"], env["url"]
    net1, net2 = env["profile"]["net1"], env["profile"]["net2"]
    default = json.loads(env["default_rules"][net2])
    opened = dict(default, inbound_rules=default["inbound_rules"]
                  + [{"action": "allow", "src_tag": net1}])
    store(h, url, "put", rules_key(net2), json.dumps(opened))
    try:
        took = wait_for(lambda: ping(h, "a1", ip["b1"]), OPEN_WITHIN)
        assert took is not None, "net1 -> net2 did not open"
        assert tcp(h, "a1", "b1", ip["b1"])
        assert tcp(h, "a2", "b1", ip["b1"])
        # only that direction: net2 -> net1 stays closed
        assert not ping(h, "b1", ip["a1"])
        assert not tcp(h, "b1", "a1", ip["a1"])
    finally:
        store(h, url, "put", rules_key(net2), env["default_rules"][net2])
    took = wait_for(lambda: not ping(h, "a1", ip["b1"]), OPEN_WITHIN)
    assert took is not None, "net1 -> net2 did not close again"
    assert not tcp(h, "a1", "b1", ip["b1"])
    assert ping(h, "a1", ip["a2"])


def test_deny_rule_first_match_wins(env):
    """A deny for TCP in front of net1's default allow: ping still works
    inside net1, TCP does not; removing it restores TCP."""
    h, ip, url = env["host"], env["ip"], env["url"]
    net1 = env["profile"]["net1"]
    default = json.loads(env["default_rules"][net1])
    denied = dict(default, inbound_rules=[{"action": "deny", "protocol": "tcp",
                                           "dst_ports": [PORT]}] + default["inbound_rules"])
    store(h, url, "put", rules_key(net1), json.dumps(denied))
    try:
        assert wait_for(lambda: not tcp(h, "a1", "a2", ip["a2"]), OPEN_WITHIN) is not None
        assert ping(h, "a1", ip["a2"])
    finally:
        store(h, url, "put", rules_key(net1), env["default_rules"][net1])
    assert wait_for(lambda: tcp(h, "a1", "a2", ip["a2"]), OPEN_WITHIN) is not None


def test_new_containers_isolated_and_reachable_at_once(env):
    """A container can ping a peer of its network as soon as it runs (no
    sleep), and a container of another network cannot, from its first packet."""
    h, ip = env["host"], env["ip"]
    for _ in range(3):
        r = h.docker("run", "--rm", "--net", "net1", "busybox",
                     "ping", "-c1", "-W2", ip["a1"], check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        r = h.docker("run", "--rm", "--net", "net2", "busybox",
                     "ping", "-c1", "-W1", ip["a1"], check=False)
        assert r.returncode != 0
        r = h.docker("run", "--rm", "--net", "net2", "busybox", "sh", "-c",
                     f"echo x | nc -w 2 {ip['a1']} {PORT}", check=False)
        assert r.returncode != 0


def test_chains_follow_containers(env):
    h = env["host"]
    before = endpoint_chains(h)
    h.docker("run", "-d", "--net", "net2", "--name", "tmpc", "busybox", "sleep", "1d")
    name = veth(h, "tmpc", "net2")
    assert {f"from-{name}", f"to-{name}"} <= endpoint_chains(h)
    assert net_info(h, "tmpc", "net2")["IPAddress"] in sets(h)[f"t4-{env['profile']['net2']}"]
    assert ping(h, "tmpc", env["ip"]["b1"])
    h.docker("rm", "-f", "tmpc")
    assert wait_for(lambda: endpoint_chains(h) == before, 5) is not None
    assert len(sets(h)[f"t4-{env['profile']['net2']}"]) == 1


def test_plugin_restart_keeps_isolation_and_reconciles(env, plugin):
    """Stopped plugin: the table stays (isolation holds, same-network traffic
    flows).  A profile edited meanwhile is applied when the plugin starts."""
    h, ip, url = env["host"], env["ip"], env["url"]
    net1, net2 = env["profile"]["net1"], env["profile"]["net2"]
    assert plugin.stop(signal.SIGTERM) == 0, plugin.log()[-3000:]
    restarted = False
    try:
        assert endpoint_chains(h)
        assert ping(h, "a1", ip["a2"]) and not ping(h, "a1", ip["b1"])
        default = json.loads(env["default_rules"][net2])
        opened = dict(default, inbound_rules=default["inbound_rules"]
                      + [{"action": "allow", "src_tag": net1}])
        store(h, url, "put", rules_key(net2), json.dumps(opened))
        assert not ping(h, "a1", ip["b1"])         # nobody applied it yet
        plugin.start()
        restarted = True
        assert wait_for(lambda: ping(h, "a1", ip["b1"]), OPEN_WITHIN) is not None
    finally:
        store(h, url, "put", rules_key(net2), env["default_rules"][net2])
        if not restarted:
            plugin.start()
    assert wait_for(lambda: not ping(h, "a1", ip["b1"]), OPEN_WITHIN) is not None


@pytest.fixture(scope="module")
def v6env(env):
    """net6a = {x1, x2}, net6b = {y1}: dual-stack networks (Docker IPAM)."""
    h = env["host"]
    d = h.docker
    d("network", "create", "--driver=calico", "--ipv6", "--subnet=192.168.12.0/24",
      "--subnet=fd00:12::/64", "net6a")
    d("network", "create", "--driver=calico", "--ipv6", "--subnet=192.168.13.0/24",
      "--subnet=fd00:13::/64", "net6b")
    names = {"x1": "net6a", "x2": "net6a", "y1": "net6b"}
    for name, net in names.items():
        d("run", "-d", "--net", net, "--name", name, "busybox", "sleep", "1d")
        listen(h, name)
    info = {n: net_info(h, n, net) for n, net in names.items()}
    v6 = {n: i["GlobalIPv6Address"] for n, i in info.items()}
    v4 = {n: i["IPAddress"] for n, i in info.items()}
    assert all(v6.values()), info
    assert profiles_of(h, env["url"], "net6a") == [["net6a"], ["net6a"]]
    profile = {net: net for net in ("net6a", "net6b")}    # profile = network name
    return {"v6": v6, "v4": v4, "profile": profile,
            "default_b": store(h, env["url"], "get", rules_key(profile["net6b"])).strip()}


def test_ipv6_isolation_and_profile_edit(env, v6env):
    h, url = env["host"], env["url"]
    v6, v4 = v6env["v6"], v6env["v4"]
    # the containers reach their fe80::1 gateway (neighbour discovery passes)
    assert ping(h, "x1", "fe80::1%eth0")
    # across networks: closed both ways, IPv6 and IPv4
    assert not ping(h, "x1", v6["y1"]) and not ping(h, "y1", v6["x1"])
    assert not tcp(h, "x1", "y1", v6["y1"])
    assert not ping(h, "x1", v4["y1"]) and not ping(h, "y1", v4["x1"])
    # and IPv4 within net6a works
    assert ping(h, "x1", v4["x2"])
    # open net6a -> net6b: routed IPv6 (no neighbour discovery between the
    # containers) now passes, the other direction not
    net6a, net6b = v6env["profile"]["net6a"], v6env["profile"]["net6b"]
    default = json.loads(v6env["default_b"])
    opened = dict(default, inbound_rules=default["inbound_rules"]
                  + [{"action": "allow", "src_tag": net6a}])
    store(h, url, "put", rules_key(net6b), json.dumps(opened))
    try:
        assert wait_for(lambda: ping(h, "x1", v6["y1"]), OPEN_WITHIN) is not None
        assert tcp(h, "x1", "y1", v6["y1"])
        assert ping(h, "x1", v4["y1"])
        assert not ping(h, "y1", v6["x1"])
    finally:
        store(h, url, "put", rules_key(net6b), v6env["default_b"])
    assert wait_for(lambda: not ping(h, "x1", v6["y1"]), OPEN_WITHIN) is not None
    s = sets(h)
    assert sorted(s[f"t6-{net6a}"]) == sorted([v6["x1"], v6["x2"]])


def test_ipv6_within_network(env, v6env):
    """Docker IPAM's /64: the containers solicit each other on the link and the
    host veths answer by proxy NDP (backends/calico/ndp.py)."""
    h, v6 = env["host"], v6env["v6"]
    assert ping(h, "x1", v6["x2"], timeout=2)
    assert ping(h, "x2", v6["x1"], timeout=2)


def test_all_removed_leaves_no_endpoint_chains(env, v6env, etcd_url, plugin):
    h = env["host"]
    h.docker("rm", "-f", "a1", "a2", "b1", "x1", "x2", "y1")
    h.docker("network", "rm", "net1", "net2", "net6a", "net6b")
    assert wait_for(lambda: endpoint_chains(h) == set(), 5) is not None, endpoint_chains(h)
    assert chains(h) == FIXED_CHAINS
    assert sets(h) == {}
    assert etcd_items(h, etcd_url) == {}
    log = plugin.log()
    assert "applied policy table" in log
    assert "cannot apply" not in log and "Traceback" not in log, log[-5000:]

