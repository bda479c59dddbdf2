"""Calico IPAM with the real dockerd and etcd: networks without --subnet, a
chosen pool, --subnet with a fixed --ip, IPv6, and each call's datastore cost
read from the plugin's own log."""
import ipaddress
import json

import pytest

from tests.plugin_proc import ROOT, PluginProcess, container_ip, etcd_items

pytestmark = [pytest.mark.integration, pytest.mark.datastores("etcd", "etcdv3")]

CONFIG = """
scope = "local"
backend = "calico"
[datastore]
type = "{kind}"
endpoints = ["{etcd}"]
[calico]
hostname = "{hostname}"
"""
POOL = "10.60.0.0/16"
POOL2 = "10.61.0.0/24"
POOL6 = "fd80:60::/64"


@pytest.fixture(scope="module")
def host(make_host):
    return make_host("ipam")


@pytest.fixture(scope="module")
def plugin(host, etcd_url):
    proc = PluginProcess(host, CONFIG.format(etcd=etcd_url, kind=etcd_url.kind, hostname=host.name)).start()
    for cidr in (POOL, POOL2, POOL6):
        ctl(proc, "pool", "add", cidr)
    yield proc
    for cidr in (POOL, POOL2, POOL6):
        ctl(proc, "pool", "remove", cidr, check=False)
    proc.stop()


def ctl(proc, *args, check=True):
    return proc.host.run(f"{ROOT}/netpluginctl", "-f", proc.config_path, *args, check=check)


def v6_address(host, name, network):
    out = host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout
    return json.loads(out)[network]["GlobalIPv6Address"]


def ping(host, container, ip):
    return host.docker("exec", container, "ping", "-c1", "-W2", ip, check=False).returncode == 0


def test_networks_without_subnet(host, plugin, etcd_url):
    """net1, net2, net3 with --ipam-driver calico and no --subnet: dockerd
    accepts each, containers get unique /32 addresses from the Calico pool."""
    for net in ("net1", "net2", "net3"):
        host.docker("network", "create", "--driver=calico", "--ipam-driver=calico", net)
    try:
        for name, net in (("w1", "net1"), ("w2", "net1"), ("w3", "net2"), ("w4", "net3")):
            host.docker("run", "-d", "--net", net, "--name", name, "busybox", "sleep", "1d")
        ips = {n: container_ip(host, n, net) for n, net in
               (("w1", "net1"), ("w2", "net1"), ("w3", "net2"), ("w4", "net3"))}
        assert len(set(ips.values())) == 4
        for ip in ips.values():
            assert ipaddress.ip_address(ip) in ipaddress.ip_network(POOL)
        assert "inet %s/32" % ips["w1"] in host.docker("exec", "w1", "ip", "-4", "addr").stdout
        assert ping(host, "w1", ips["w2"]) and ping(host, "w2", ips["w1"])
        assert not ping(host, "w1", ips["w3"])          # another network: isolated
        # Cost per call, as logged by the plugin while dockerd drove it.
        assert plugin.costs("CreateNetwork")[-3:] == [(0, 1, 0)] * 3
        first, *rest = plugin.costs("IpamDriver.RequestAddress")[:4]
        # (one W of each: the request's Calico IPAM handle key).  The first
        # finds no block (the batch's list of the host's blocks, then the
        # full path claims one: 5R 4W); the others read the block the last
        # batch used, count the handle and write the block: 1R 2W.
        assert first == (5, 4, 0) and all(c == (1, 2, 0) for c in rest), (first, rest)
        # network, profile and (Calico IPAM) the address's block; the first
        # endpoint of a network also stores its profile (named after it)
        assert set(plugin.costs("CreateEndpoint")[-4:]) == {(3, 5, 0), (3, 1, 0)}
        assert set(plugin.costs("Join")) == {(1, 0, 0)}
    finally:
        host.docker("rm", "-f", "w1", "w2", "w3", "w4", check=False)
        host.docker("network", "rm", "net1", "net2", "net3", check=False)
    assert set(plugin.costs("DeleteNetwork")[-3:]) == {(2, 0, 3)}
    # Calico's table: >= 1R >= 1W; each compare-and-swap retry under
    # contention (parallel removals) costs one more read and write.
    for r, w, d in plugin.costs("IpamDriver.ReleaseAddress"):
        assert (r, w, d) == (0, 0, 0) or (1 <= r <= 5 and r == w + d), (r, w, d)
    assert [k for k in etcd_items(host, etcd_url) if "/workload/" in k
            or "/profile/" in k or "/libnetwork/" in k] == []


def test_chosen_pool_fixed_ip_and_errors(host, plugin):
    host.docker("network", "create", "--driver=calico", "--ipam-driver=calico",
                "--ipam-opt", f"pool={POOL2}", "chosen")
    host.docker("network", "create", "--driver=calico", "--ipam-driver=calico",
                "--subnet=10.60.200.0/24", "fixed")
    try:
        host.docker("run", "-d", "--net", "chosen", "--name", "pc", "busybox", "sleep", "1d")
        assert ipaddress.ip_address(container_ip(host, "pc", "chosen")) in \
            ipaddress.ip_network(POOL2)
        host.docker("run", "-d", "--net", "fixed", "--ip", "10.60.200.7", "--name", "f1",
                    "busybox", "sleep", "1d")
        assert container_ip(host, "f1", "fixed") == "10.60.200.7"
        r = host.docker("run", "-d", "--net", "fixed", "--ip", "10.60.200.7", "--name", "f2",
                        "busybox", "sleep", "1d", check=False)
        assert r.returncode != 0 and "already in use" in r.stderr, r.stderr
        r = host.docker("network", "create", "--driver=calico", "--ipam-driver=calico",
                        "--subnet=172.31.99.0/24", "outside", check=False)
        assert r.returncode != 0 and "172.31.99.0/24" in r.stderr, r.stderr
        r = host.docker("network", "create", "--driver=calico", "--ipam-driver=calico",
                        "--ipam-opt", "colour=blue", "badopt", check=False)
        assert r.returncode != 0 and "colour" in r.stderr, r.stderr
    finally:
        host.docker("rm", "-f", "pc", "f1", "f2", check=False)
        host.docker("network", "rm", "chosen", "fixed", "outside", "badopt", check=False)


def test_ipv6_network(host, plugin):
    host.docker("network", "create", "--driver=calico", "--ipam-driver=calico", "--ipv6", "n6")
    try:
        for name in ("s1", "s2"):
            host.docker("run", "-d", "--net", "n6", "--name", name, "busybox", "sleep", "1d")
        a1, a2 = v6_address(host, "s1", "n6"), v6_address(host, "s2", "n6")
        for a in (a1, a2):
            assert ipaddress.ip_address(a) in ipaddress.ip_network(POOL6)
        assert ping(host, "s1", a2) and ping(host, "s2", a1)
        assert ping(host, "s1", container_ip(host, "s2", "n6"))
        routes6 = host.docker("exec", "s1", "ip", "-6", "route").stdout
        assert "default via fe80::1 dev eth0" in routes6, routes6
    finally:
        host.docker("rm", "-f", "s1", "s2", check=False)
        host.docker("network", "rm", "n6", check=False)
