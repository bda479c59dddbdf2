"""Calico networking with Docker's IPAM, end to end: real dockerd in a lab host,
the real plugin (./plugin) beside it, real etcd / embedded datastore, real
netlink.  Nothing here runs in the machine's own network namespace."""
import json
import re
import os
import signal
import time

import pytest

from netplugin.config import DatastoreConfig
from tests.plugin_proc import PluginProcess, container_ip, etcd_config, etcd_items

pytestmark = [pytest.mark.integration, pytest.mark.datastores("etcd", "etcdv3")]


EMBEDDED_CONFIG = """
backend = "calico"
[datastore]
type = "embedded"
path = "{path}"
[calico]
hostname = "{hostname}"
mtu = 1400
"""


def _store(ds_cfg):
    from netplugin.datastore import open_datastore
    return open_datastore(ds_cfg)


@pytest.fixture(scope="module")
def plugin(host_a, etcd_url):
    """The plugin on etcd, serving host_a's dockerd for the whole module."""
    proc = PluginProcess(host_a, etcd_config(etcd_url, host_a.name))
    proc.start()
    yield proc
    proc.stop()


def docker(host, *args, **kw):
    return host.docker(*args, **kw)


def host_links(host):
    return host.run("ip", "-o", "link", "show").stdout


def host_routes(host):
    return host.run("ip", "-4", "route", "show").stdout


def wait_gone(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not fn():
            return True
        time.sleep(0.2)
    return False


def test_ping_within_network_and_routes(host_a, plugin, etcd_url):
    docker(host_a, "network", "create", "--driver=calico", "--subnet=192.168.0.0/24", "net1")
    docker(host_a, "network", "create", "--driver=calico", "--subnet=192.168.1.0/24", "net2")
    try:
        docker(host_a, "run", "-d", "--net", "net1", "--name", "ca", "busybox", "sleep", "1d")
        docker(host_a, "run", "-d", "--net", "net1", "--name", "cb", "busybox", "sleep", "1d")
        docker(host_a, "run", "-d", "--net", "net2", "--name", "cc", "busybox", "sleep", "1d")
        ip_a = container_ip(host_a, "ca", "net1")
        ip_b = container_ip(host_a, "cb", "net1")
        ip_c = container_ip(host_a, "cc", "net2")
        assert ip_a.startswith("192.168.0.") and ip_b.startswith("192.168.0.")
        assert ip_c.startswith("192.168.1.")

        # Address in the subnet, default route via the Calico gateway.
        addr = docker(host_a, "exec", "ca", "ip", "-4", "addr", "show", "eth0").stdout
        assert f"inet {ip_a}/" in addr
        routes = docker(host_a, "exec", "ca", "ip", "route").stdout
        assert "default via 169.254.1.1 dev eth0" in routes
        assert "169.254.1.1 dev eth0" in routes

        # Host side: one cali veth per container, a /32 route to each address.
        hroutes = host_routes(host_a)
        for ip in (ip_a, ip_b, ip_c):
            assert re.search(rf"^{re.escape(ip)} dev cali\w+ ", hroutes, re.M), hroutes

        # a and b ping each other; docker run --rm pings a.
        docker(host_a, "exec", "ca", "ping", "-c1", "-W2", ip_b)
        docker(host_a, "exec", "cb", "ping", "-c1", "-W2", ip_a)
        docker(host_a, "run", "--rm", "--net", "net1", "busybox", "ping", "-c1", "-W2", ip_a)
    finally:
        docker(host_a, "rm", "-f", "ca", "cb", "cc", check=False)
        docker(host_a, "network", "rm", "net1", "net2", check=False)

    # Nothing left: no cali device, no /32 route, no datastore key.
    assert "cali" not in host_links(host_a)
    assert "192.168." not in host_routes(host_a)
    assert etcd_items(host_a, etcd_url) == {}


def test_datastore_cost_per_call(host_a, plugin):
    """The Calico plugin's published table (backends/calico/driver.py), local
    scope: CreateNetwork 2R/2W, the network's first CreateEndpoint 2R/5W (it
    stores the profile named after the network), Join 1R, Leave 1R,
    DeleteEndpoint 1R/1D, DeleteNetwork 2R/4D (measured from the plugin's own
    per-call log while real dockerd drives it)."""
    before = {c: len(plugin.costs(c)) for c in
              ("CreateNetwork", "CreateEndpoint", "Join", "Leave", "DeleteEndpoint",
               "DeleteNetwork")}
    docker(host_a, "network", "create", "--driver=calico", "--subnet=192.168.5.0/24", "cost")
    try:
        docker(host_a, "run", "--rm", "--net", "cost", "busybox", "true")
    finally:
        docker(host_a, "network", "rm", "cost", check=False)
    time.sleep(0.5)

    def new(c):
        return plugin.costs(c)[before[c]:]

    assert new("CreateNetwork") == [(2, 2, 0)]
    assert new("CreateEndpoint") == [(2, 5, 0)]
    assert new("Join") == [(1, 0, 0)]
    assert new("Leave") == [(1, 0, 0)]
    assert new("DeleteEndpoint") == [(1, 0, 1)]
    assert new("DeleteNetwork") == [(2, 0, 4)]


def test_network_options_and_bad_options(host_a, plugin, etcd_url):
    r = docker(host_a, "network", "create", "--driver=calico", "--subnet=192.168.7.0/24",
               "-o", "ipip=maybe", "bad", check=False)
    assert r.returncode != 0 and "ipip" in r.stderr and "maybe" in r.stderr
    r = docker(host_a, "network", "create", "--driver=calico", "--subnet=192.168.7.0/24",
               "-o", "colour=blue", "bad", check=False)
    assert r.returncode != 0 and "colour" in r.stderr
    assert etcd_items(host_a, etcd_url) == {}  # nothing half-written

    docker(host_a, "network", "create", "--driver=calico", "--subnet=192.168.7.0/24",
           "-o", "ipip=false", "-o", "nat-outgoing=true", "opts")
    try:
        pool = json.loads(etcd_items(host_a, etcd_url, "/calico/v1/ipam/v4/pool")[
            "/calico/v1/ipam/v4/pool/192.168.7.0-24"])
        assert pool["cidr"] == "192.168.7.0/24" and pool["ipam"] is False
        assert "ipip" not in pool and pool["masquerade"] is True
    finally:
        docker(host_a, "network", "rm", "opts")
    assert etcd_items(host_a, etcd_url) == {}


def test_garbage_over_socket_gets_json_err(plugin):
    for path, raw in [("/NetworkDriver.CreateNetwork", b"{garbage"),
                      ("/NetworkDriver.CreateEndpoint", b'{"NetworkID": 7}'),
                      ("/NetworkDriver.Join", b'{"NetworkID": "x", "EndpointID": "y",'
                                              b' "SandboxKey": "/nope"}'),
                      ("/NetworkDriver.DeleteNetwork", b"[1,2,3]"),
                      ("/IpamDriver.RequestAddress", b"{}"),
                      ("/IpamDriver.RequestPool", b'{"Pool": "10.0.0.0/33"}')]:
        status, body = plugin.call(path, raw=raw)
        assert status == 500 and body["Err"], (path, body)
    # An unknown endpoint: clear error, nothing created.
    status, body = plugin.call("/NetworkDriver.Join", {
        "NetworkID": "f" * 64, "EndpointID": "e" * 64, "SandboxKey": "/var/run/docker/netns/x"})
    assert status == 500 and "e" * 12 in body["Err"]
    assert plugin.call("/Plugin.Activate") == (
        200, {"Implements": ["NetworkDriver", "IpamDriver"]})


def test_datastore_down_gives_clear_error_and_recovers(lab, host_a, plugin, etcd_url):
    lab.stop_etcd()
    try:
        r = docker(host_a, "network", "create", "--driver=calico",
                   "--subnet=192.168.9.0/24", "down", check=False)
        assert r.returncode != 0 and "etcd" in r.stderr, r.stderr
    finally:
        lab.start_etcd()
    docker(host_a, "network", "rm", "down", check=False)
    docker(host_a, "network", "create", "--driver=calico", "--subnet=192.168.9.0/24", "up")
    docker(host_a, "network", "rm", "up")
    assert etcd_items(host_a, etcd_url) == {}


def test_embedded_datastore_and_sigterm(host_b):
    """Default-style config (embedded datastore, [calico] mtu) on a second host;
    SIGTERM stops the plugin cleanly and removes its socket."""
    path = os.path.join(host_b.dir, "state.db")
    proc = PluginProcess(host_b, EMBEDDED_CONFIG.format(path=path, hostname=host_b.name))
    proc.start()
    try:
        docker(host_b, "network", "create", "--driver=calico", "--subnet=192.168.20.0/24", "e1")
        docker(host_b, "run", "-d", "--net", "e1", "--name", "cx", "busybox", "sleep", "1d")
        docker(host_b, "run", "-d", "--net", "e1", "--name", "cy", "busybox", "sleep", "1d")
        ip_y = container_ip(host_b, "cy", "e1")
        docker(host_b, "exec", "cx", "ping", "-c1", "-W2", ip_y)
        mtu = docker(host_b, "exec", "cx", "cat", "/sys/class/net/eth0/mtu").stdout.strip()
        assert mtu == "1400"
        docker(host_b, "rm", "-f", "cx", "cy")
        docker(host_b, "network", "rm", "e1")
        assert "cali" not in host_links(host_b)
        store = _store(DatastoreConfig(type="embedded", path=path))
        assert store.list_prefix("/calico") == []
    finally:
        docker(host_b, "rm", "-f", "cx", "cy", check=False)
        docker(host_b, "network", "rm", "e1", check=False)
        rc = proc.stop(signal.SIGTERM)
    assert rc == 0, proc.log()
    assert not os.path.exists(proc.socket_path)


def test_container_on_two_networks(host_a, plugin, etcd_url):
    """`docker network connect`: a second Calico interface (next hop 169.254.1.2,
    no "file exists"), peers on both networks reachable, clean disconnect."""
    docker(host_a, "network", "create", "--driver=calico", "--subnet=192.168.30.0/24", "m1")
    docker(host_a, "network", "create", "--driver=calico", "--subnet=192.168.31.0/24", "m2")
    try:
        docker(host_a, "run", "-d", "--net", "m1", "--name", "p1", "busybox", "sleep", "1d")
        docker(host_a, "run", "-d", "--net", "m2", "--name", "p2", "busybox", "sleep", "1d")
        docker(host_a, "run", "-d", "--net", "m1", "--name", "both", "busybox", "sleep", "1d")
        docker(host_a, "network", "connect", "m2", "both")
        ip1, ip2 = container_ip(host_a, "p1", "m1"), container_ip(host_a, "p2", "m2")
        routes = docker(host_a, "exec", "both", "ip", "route").stdout
        assert "default via 169.254.1.1 dev eth0" in routes
        assert "169.254.1.2 dev eth1" in routes, routes
        docker(host_a, "exec", "both", "ping", "-c1", "-W2", ip1)
        # The first packet of each: Join waits for the policy agent (the
        # barrier), which knows both interfaces are one container.
        docker(host_a, "exec", "both", "ping", "-c1", "-W2", ip2)
        # Started with two networks at once: both Joins happen before the
        # container's namespace exists.
        docker(host_a, "create", "--net", "m1", "--name", "both2", "busybox", "sleep", "1d")
        docker(host_a, "network", "connect", "m2", "both2")
        docker(host_a, "start", "both2")
        docker(host_a, "exec", "both2", "ping", "-c1", "-W2", ip1)
        docker(host_a, "exec", "both2", "ping", "-c1", "-W2", ip2)
        docker(host_a, "network", "disconnect", "m2", "both")
        docker(host_a, "exec", "both", "ping", "-c1", "-W2", ip1)
        assert "eth1" not in docker(host_a, "exec", "both", "ip", "link").stdout
    finally:
        docker(host_a, "rm", "-f", "p1", "p2", "both", "both2", check=False)
        docker(host_a, "network", "rm", "m1", "m2", check=False)
    assert "cali" not in host_links(host_a)
    assert etcd_items(host_a, etcd_url) == {}


def test_network_mtu_option(host_a, plugin, etcd_url):
    r = docker(host_a, "network", "create", "--driver=calico", "--subnet=192.168.32.0/24",
               "-o", "mtu=big", "badmtu", check=False)
    assert r.returncode != 0 and "mtu" in r.stderr
    docker(host_a, "network", "create", "--driver=calico", "--subnet=192.168.32.0/24",
           "-o", "mtu=1280", "small")
    try:
        docker(host_a, "run", "-d", "--net", "small", "--name", "mt", "busybox", "sleep", "1d")
        assert docker(host_a, "exec", "mt", "cat", "/sys/class/net/eth0/mtu").stdout.strip() \
            == "1280"
        links = host_a.run("ip", "-o", "link", "show").stdout
        assert re.search(r"cali\w+@\w+: .* mtu 1280 ", links), links
    finally:
        docker(host_a, "rm", "-f", "mt", check=False)
        docker(host_a, "network", "rm", "small", check=False)
    assert etcd_items(host_a, etcd_url) == {}
