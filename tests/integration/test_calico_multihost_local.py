"""Two lab hosts WITHOUT a cluster store (every network local to its dockerd,
with its own NetworkID per host: Docker >= 23's only mode), one shared etcd,
each host running the plugin with scope "local".  The same network created
on both hosts is one Calico network: one profile named after the Docker
network (or ``-o profile=``), routed across hosts for IPv4 and IPv6
(bird_ip / bird6_ip), isolated from the other networks; the profile lives
until the last host removes its network; a kill -9 and immediate restart of
one plugin keeps traffic flowing; Docker-IPAM subnets are never shared
between hosts (refused: duplicate addresses) nor overlap a Calico pool.
"""
import ipaddress
import json
import signal

import pytest

from tests.plugin_proc import LAUNCHER, PluginProcess, container_ip, etcd_config, store
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.datastores("etcd", "etcdv3")]

CTL = LAUNCHER.replace("/plugin", "/netpluginctl")
POOL = "192.168.0.0/16"
POOL6 = "fd80:61::/64"
PROTO = "78"   # routes.RTPROT_NETPLUGIN


def items(host, url, prefix="/calico"):
    return json.loads(store(host, url, "list", prefix))


def ping(host, container, ip, wait=2):
    return host.docker("exec", container, "ping", "-c1", f"-W{wait}", ip,
                       check=False).returncode == 0


def ctl(host, cfg_path, *args):
    return host.run(CTL, "-f", cfg_path, *args, timeout=60)


def v6(host, name, network):
    out = host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout
    return json.loads(out)[network]["GlobalIPv6Address"]


def net_id(host, name):
    return host.docker("network", "inspect", "-f", "{{.Id}}", name).stdout.strip()


def addr6(host):
    return f"fd99::{host.addr.rsplit('.', 1)[1]}"


def plugin_config(host, etcd_url):
    return etcd_config(etcd_url, host.name, "local", ip=host.addr, ip6=addr6(host),
                       docker_endpoint=f"unix://{host.sock}")


@pytest.fixture(scope="module")
def two_hosts(make_host):
    a = make_host("la")
    b = make_host("lb")
    for h in (a, b):
        h.ip("-6", "addr", "add", f"{addr6(h)}/64", "dev", "eth0", "nodad")
    return a, b


@pytest.fixture(scope="module")
def fabric(two_hosts, etcd_url):
    a, b = two_hosts
    plugins = []
    for h in (a, b):
        proc = PluginProcess(h, plugin_config(h, etcd_url))
        proc.start()
        plugins.append(proc)
    yield a, b, plugins
    for h in (a, b):   # the hosts serve the next datastore kind: nothing left over
        names = h.docker("ps", "-aq", check=False).stdout.split()
        if names:
            h.docker("rm", "-f", *names, check=False)
        nets = h.docker("network", "ls", "-q", "--filter", "driver=calico",
                        check=False).stdout.split()
        if nets:
            h.docker("network", "rm", *nets, check=False)
    for proc in plugins:
        proc.stop()


def dump_state(a, b, plugins, etcd_url):
    out = []
    for h, p in zip((a, b), plugins):
        out.append(f"--- {h.name} routes\n" + h.ip("route").stdout + h.ip("-6", "route").stdout)
        out.append(f"--- {h.name} plugin log (tail)\n" + "\n".join(p.log().splitlines()[-40:]))
    out.append("--- etcd /calico\n" + json.dumps(items(a, etcd_url), indent=1)[:6000])
    return "\n".join(out)


def leftovers(a, etcd_url):
    return {k: v for k, v in items(a, etcd_url).items()
            if "/endpoint/" in k or k.startswith(("/calico/ipam/v2/assignment/",
                                                  "/calico/ipam/v2/host/",
                                                  "/calico/libnetwork/",
                                                  "/calico/v1/policy/"))}


def test_same_network_on_two_hosts_is_one_calico_network(fabric, etcd_url):
    a, b, plugins = fabric
    cfg = plugins[0].config_path
    ctl(a, cfg, "pool", "add", POOL)
    ctl(a, cfg, "pool", "add", POOL6)
    placement = {"ca1": (a, "net1"), "ca2": (a, "net2"), "cb1": (b, "net1"),
                 "cb2": (b, "net2"), "cax": (a, "blue"), "cbx": (b, "green")}
    try:
        for h in (a, b):
            h.docker("network", "create", "--driver", "calico", "--ipam-driver", "calico",
                     "--ipv6", "net1")
            h.docker("network", "create", "--driver", "calico", "--ipam-driver", "calico",
                     "net2")
        # two differently named networks, one profile
        a.docker("network", "create", "--driver", "calico", "--ipam-driver", "calico",
                 "-o", "profile=team", "blue")
        b.docker("network", "create", "--driver", "calico", "--ipam-driver", "calico",
                 "-o", "profile=team", "green")
        assert net_id(a, "net1") != net_id(b, "net1")        # no cluster store
        for name, (host, net) in placement.items():
            host.docker("run", "-d", "--net", net, "--name", name, "busybox", "sleep", "1d")
        ips = {name: container_ip(host, name, net) for name, (host, net) in placement.items()}
        assert len(set(ips.values())) == len(ips), ips
        ips6 = {name: v6(placement[name][0], name, "net1") for name in ("ca1", "cb1")}
        for addr in ips6.values():
            assert ipaddress.ip_address(addr) in ipaddress.ip_network(POOL6), ips6

        state = items(a, etcd_url)
        profiles = {k.split("/")[5] for k in state if k.startswith("/calico/v1/policy/profile/")}
        assert profiles == {"net1", "net2", "team"}, profiles
        eps = [json.loads(v) for k, v in state.items() if "/endpoint/" in k]
        assert sorted(e["profile_ids"][0] for e in eps) == sorted(
            ["net1", "net1", "net2", "net2", "team", "team"])
        assert state["/calico/v1/host/la/bird6_ip"] == addr6(a)

        def across(src, dst, ip=None):
            host = placement[src][0]
            return wait_for(lambda: ping(host, src, ip or ips[dst]), 15)
        for src, dst in (("ca1", "cb1"), ("cb1", "ca1"), ("ca2", "cb2"), ("cax", "cbx"),
                         ("cbx", "cax")):
            assert across(src, dst), f"{src} cannot ping {dst}\n" + dump_state(
                a, b, plugins, etcd_url)
        assert across("ca1", "cb1", ips6["cb1"]) and across("cb1", "ca1", ips6["ca1"]), \
            "no IPv6 across hosts\n" + dump_state(a, b, plugins, etcd_url)
        # isolation across hosts
        for src, dst in (("ca1", "cb2"), ("ca2", "cb1"), ("cb1", "cax"), ("cbx", "ca1")):
            assert not ping(placement[src][0], src, ips[dst], 1), f"{src} reached {dst}"

        # kill -9 of host A's plugin and an immediate restart
        plugins[0].stop(signal.SIGKILL)
        plugins[0].start()
        assert across("cb1", "ca1"), dump_state(a, b, plugins, etcd_url)
        a.docker("run", "-d", "--net", "net1", "--name", "ca3", "busybox", "sleep", "1d")
        placement["ca3"] = (a, "net1")
        ips["ca3"] = container_ip(a, "ca3", "net1")
        assert across("cb1", "ca3") and across("ca3", "cb1"), dump_state(a, b, plugins, etcd_url)
        assert not ping(b, "cb2", ips["ca3"], 1)

        # host A removes net1: host B's net1 keeps its profile and its traffic
        a.docker("rm", "-f", "ca1", "ca3")
        a.docker("network", "rm", "net1")
        assert "/calico/v1/policy/profile/net1/rules" in items(a, etcd_url)
        b.docker("run", "-d", "--net", "net1", "--name", "cb3", "busybox", "sleep", "1d")
        placement["cb3"] = (b, "net1")
        assert ping(b, "cb3", ips["cb1"]) and not ping(b, "cb3", ips["cb2"], 1)
    finally:
        for name, (host, _) in placement.items():
            host.docker("rm", "-f", name, check=False)
        a.docker("network", "rm", "net1", "net2", "blue", check=False)
        b.docker("network", "rm", "net1", "net2", "green", check=False)
        ctl(a, cfg, "pool", "remove", POOL)
        ctl(a, cfg, "pool", "remove", POOL6)
    assert wait_for(lambda: not leftovers(a, etcd_url), 20), dump_state(a, b, plugins, etcd_url)
    assert wait_for(lambda: not a.ip("route", "show", "proto", PROTO).stdout.strip()
                    and not b.ip("-6", "route", "show", "proto", PROTO).stdout.strip(), 20), \
        dump_state(a, b, plugins, etcd_url)


def test_docker_ipam_subnets_are_never_shared(fabric, etcd_url):
    a, b, plugins = fabric
    cfg = plugins[0].config_path
    try:
        a.docker("network", "create", "--driver", "calico", "--subnet", "10.77.0.0/24", "dn")
        r = b.docker("network", "create", "--driver", "calico", "--subnet", "10.77.0.0/24",
                     "dn", check=False)
        assert r.returncode != 0 and "--ipam-driver calico" in r.stderr, r.stderr
        assert "dn" not in b.docker("network", "ls", "--format", "{{.Name}}").stdout.split()
        a.docker("run", "-d", "--net", "dn", "--name", "da1", "busybox", "sleep", "1d")
        assert container_ip(a, "da1", "dn").startswith("10.77.0.")

        # an operator's Calico pool is never overlapped, written or deleted
        ctl(a, cfg, "pool", "add", POOL)
        before = {k: v for k, v in items(a, etcd_url, "/calico/v1/ipam/").items()}
        r = a.docker("network", "create", "--driver", "calico", "--subnet", "192.168.7.0/24",
                     "over", check=False)
        assert r.returncode != 0 and POOL in r.stderr, r.stderr
        assert items(a, etcd_url, "/calico/v1/ipam/") == before

        # a raw CreateEndpoint with a neighbour's address is refused, nothing stored
        nid = net_id(a, "dn")
        status, body = plugins[0].call("/NetworkDriver.CreateEndpoint", {
            "NetworkID": nid, "EndpointID": "e" * 64,
            "Interface": {"Address": "10.99.0.2/32"}, "Options": {}})
        assert status == 500 and "outside the subnet" in body["Err"], body
        assert not any("e" * 64 in k for k in items(a, etcd_url))
        # DeleteNetwork of an unknown ID changes nothing
        snapshot = items(a, etcd_url)
        status, _ = plugins[0].call("/NetworkDriver.DeleteNetwork", {"NetworkID": "team-x"})
        assert status == 200 and items(a, etcd_url) == snapshot
    finally:
        a.docker("rm", "-f", "da1", check=False)
        a.docker("network", "rm", "dn", "over", check=False)
        b.docker("network", "rm", "dn", check=False)
        ctl(a, cfg, "pool", "remove", POOL)
    assert wait_for(lambda: not leftovers(a, etcd_url), 20), dump_state(a, b, plugins, etcd_url)
    assert not items(a, etcd_url, "/calico/v1/ipam/")
