"""Faults on a 3-member etcd cluster (one member per lab host: ea, eb, ec)
with the `etcdv3` datastore and two plugin hosts (ea, eb) with real dockerds:

* kill -9 the leader (the first endpoint of the plugins' list) while 12
  containers start concurrently across both hosts: every start succeeds,
  every running container has exactly one allocation in the IPAM blocks,
  every allocation belongs to a running container, the addresses are
  distinct, the killed member rejoins;
* every member down for 10 s: a container start in that window fails with a
  clear Err and leaves nothing behind; after it, starts work again without
  restarting the plugin;
* etcd history compacted while a plugin is down: on restart its host agent
  resyncs (routes to the other host's containers are right).

One Docker version is enough here (the datastore is what is tested)."""
import ipaddress
import json
import signal
import threading
import time

import pytest

from tests.lab.etcd import EtcdCluster
from tests.plugin_proc import (LAUNCHER, LabStore, PluginProcess, container_ip, etcd_config,
                               store, wait_until)

pytestmark = [pytest.mark.integration, pytest.mark.docker_versions("26")]

CTL = LAUNCHER.replace("/plugin", "/netpluginctl")
POOL = "10.64.0.0/16"
NET = "fnet"


@pytest.fixture(scope="module")
def fabric(make_host):
    a = make_host("ea")
    b = make_host("eb")
    c = make_host("ec", dockerd=False)
    cluster = EtcdCluster([a, b, c])
    cluster.start()
    leader = cluster.leader()
    endpoints = [leader.url] + [m.url for m in cluster.members if m is not leader]
    url = LabStore(endpoints[0], "etcdv3", endpoints)
    plugins = [PluginProcess(h, etcd_config(url, h.name, "local", ip=h.addr,
                                            docker_endpoint=f"unix://{h.sock}")).start()
               for h in (a, b)]
    a.run(CTL, "-f", plugins[0].config_path, "pool", "add", POOL, timeout=60)
    for h in (a, b):
        h.docker("network", "create", "--driver", "calico", "--ipam-driver", "calico", NET)
    yield {"hosts": (a, b), "cluster": cluster, "url": url, "plugins": plugins}
    for h in (a, b):
        names = h.docker("ps", "-aq", check=False).stdout.split()
        if names:
            h.docker("rm", "-f", *names, check=False)
        h.docker("network", "rm", NET, check=False)
    for p in plugins:
        p.stop()
    cluster.stop()


def allocations(host, url):
    """Every allocated IPv4 address in the IPAM blocks -> its handle."""
    blocks = json.loads(store(host, url, "list", "/calico/ipam/v2/assignment/ipv4/block"))
    out = {}
    for value in blocks.values():
        block = json.loads(value)
        net = ipaddress.ip_network(block["cidr"])
        for ordinal, index in enumerate(block["allocations"]):
            if index is not None:
                addr = str(net.network_address + ordinal)
                assert addr not in out, f"{addr} allocated twice"
                out[addr] = block["attributes"][index].get("handle_id")
    return out


def running_ips(hosts):
    ips = {}
    for h in hosts:
        for name in h.docker("ps", "--format", "{{.Names}}").stdout.split():
            ips[(h.name, name)] = container_ip(h, name, NET)
    return ips


def check_ipam(fabric):
    a, b = fabric["hosts"]
    ips = running_ips((a, b))
    alloc = allocations(a, fabric["url"])
    assert len(set(ips.values())) == len(ips), ips                # distinct
    assert sorted(ips.values()) == sorted(alloc), (ips, alloc)    # one each, no leak
    return ips


def remove_all(hosts):
    for h in hosts:
        names = h.docker("ps", "-aq").stdout.split()
        if names:
            h.docker("rm", "-f", *names)


def test_leader_killed_during_concurrent_starts(fabric):
    a, b = fabric["hosts"]
    cluster = fabric["cluster"]
    leader = cluster.leader()
    results = {}

    def start(host, name):
        r = host.docker("run", "-d", "--net", NET, "--name", name, "busybox", "sleep", "1d",
                        check=False, timeout=180)
        results[name] = (r.returncode, r.stderr.strip())

    threads = [threading.Thread(target=start, args=(h, f"k{h.name}{n}"))
               for n in range(6) for h in (a, b)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    leader.kill(signal.SIGKILL)
    for t in threads:
        t.join(240)
    failed = {n: r for n, r in results.items() if r[0] != 0}
    assert len(results) == 12 and not failed, failed
    ips = check_ipam(fabric)
    assert len(ips) == 12
    # the plugin answers; the killed member rejoins
    a.docker("run", "-d", "--net", NET, "--name", "after", "busybox", "sleep", "1d")
    leader.start()
    wait_until(lambda: all(m.answers() for m in cluster.members), 30,
               what="the killed member answering again")
    cluster.wait_leader()
    check_ipam(fabric)
    remove_all((a, b))
    wait_until(lambda: allocations(a, fabric["url"]) == {}, 30, what="every address released")


def test_all_members_down_then_back(fabric):
    a, b = fabric["hosts"]
    cluster = fabric["cluster"]
    a.docker("run", "-d", "--net", NET, "--name", "before", "busybox", "sleep", "1d")
    for m in cluster.members:
        m.kill(signal.SIGKILL)
    down_at = time.monotonic()
    try:
        r = a.docker("run", "-d", "--net", NET, "--name", "during", "busybox", "sleep", "1d",
                     check=False, timeout=120)
        assert r.returncode != 0
        assert "etcdv3 at " in r.stderr and "unreachable" in r.stderr, r.stderr
        time.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
    finally:
        for m in cluster.members:
            m.start()
    cluster.wait_leader()
    a.docker("rm", "-f", "during", check=False)
    b.docker("run", "-d", "--net", NET, "--name", "after2", "busybox", "sleep", "1d")
    a.docker("run", "-d", "--net", NET, "--name", "after1", "busybox", "sleep", "1d")
    ips = check_ipam(fabric)   # nothing left of the failed start
    assert sorted(n for _, n in ips) == ["after1", "after2", "before"]
    remove_all((a, b))
    wait_until(lambda: allocations(a, fabric["url"]) == {}, 30, what="every address released")


def _routes(host):
    return host.run("ip", "-4", "route", "show", "proto", "78").stdout


def test_compaction_during_plugin_downtime_resyncs(fabric):
    """Addresses from Docker's IPAM get a /32 route on the other host: b's
    plugin is down while a's container changes and the history is compacted;
    when b's plugin is back, its routes are right."""
    a, b = fabric["hosts"]
    url = fabric["url"]
    plugin_b = fabric["plugins"][1]
    a.docker("network", "create", "--driver", "calico", "--subnet", "10.65.1.0/24", "dnet")
    try:
        a.docker("run", "-d", "--net", "dnet", "--ip", "10.65.1.10", "--name", "old",
                 "busybox", "sleep", "1d")
        wait_until(lambda: "10.65.1.10 via" in _routes(b), 30, what="b's route to old")
        plugin_b.stop()
        a.docker("rm", "-f", "old")
        a.docker("run", "-d", "--net", "dnet", "--ip", "10.65.1.11", "--name", "new",
                 "busybox", "sleep", "1d")
        for n in range(20):          # history to compact away
            store(a, url, "put", f"/calico/test/churn/{n}", str(n))
        store(a, url, "rmtree", "/calico/test")
        store(a, url, "compact")
        plugin_b.start()
        wait_until(lambda: "10.65.1.11 via" in _routes(b) and "10.65.1.10 " not in _routes(b),
                   30, what="b's routes: 10.65.1.11 in, 10.65.1.10 out")
        # and b's agent follows live changes again
        a.docker("rm", "-f", "new")
        wait_until(lambda: "10.65.1.11 " not in _routes(b), 30, what="route to new removed")
    finally:
        a.docker("rm", "-f", "old", "new", check=False)
        a.docker("network", "rm", "dnet", check=False)
