"""The Calico leak reconciler (backends/calico/audit.py ``AuditLoop``) in the
plugin's agent, end to end: one lab host with a real dockerd, the real plugin
(./plugin) on the lab's etcd with a short ``[calico] audit_interval``.

Leaks planted while the plugin runs (so only the periodic runs can find
them): an endpoint record of a failed DeleteEndpoint (Docker does not know the
endpoint, its veth is gone) holding a Calico IPAM address, and a block
affinity of a host removed with ``netpluginctl host remove`` (written late, as
by that host's dying plugin).  The reconciler removes both while live
containers keep their records, addresses and connectivity; a ``cali*`` veth
without the plugin's marker (Calico CNI's kind) is left alone.  While dockerd
is down nothing is removed; when it is back the reconciler runs again.

Nothing here runs in the machine's own network namespace."""
import json
import os
import time

import pytest

from tests.plugin_proc import PluginProcess, ROOT, container_ip, etcd_config, etcd_items, store
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

POOL = "10.89.0.0/16"
EP_DIR = "/calico/v1/host/{host}/workload/libnetwork/libnetwork/endpoint/"
AFFINITY_DIR = "/calico/ipam/v2/host/{host}/ipv4/block/"
CTL = os.path.join(ROOT, "netpluginctl")
GHOST = "ghost-host"


def records(host, url):
    return {k.rsplit("/", 1)[1]: json.loads(v)
            for k, v in etcd_items(host, url, EP_DIR.format(host=host.name)).items()}


def allocated(host, url):
    import ipaddress
    out = set()
    for value in etcd_items(host, url, "/calico/ipam/v2/assignment/").values():
        block = json.loads(value)
        net = ipaddress.ip_network(block["cidr"])
        out |= {str(net.network_address + o)
                for o, a in enumerate(block["allocations"]) if a is not None}
    return out


def affinities(host, url, of):
    return sorted(etcd_items(host, url, AFFINITY_DIR.format(host=of)))


def links(host):
    out = host.run("ip", "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def ping(host, container, ip):
    return host.docker("exec", container, "ping", "-c1", "-W2", ip,
                       check=False).returncode == 0


def plant_endpoint(host, url, eid, nid, ip, profile="rnet"):
    """An endpoint record as CreateEndpoint writes it: the profile is the
    network's name, the record names the network's ID."""
    store(host, url, "put", EP_DIR.format(host=host.name) + eid, json.dumps(
        {"state": "active", "name": "cali" + eid[:11], "mac": "ee:ee:ee:ee:ee:ee",
         "profile_ids": [profile], "labels": {}, "ipv4_nets": [ip + "/32"], "ipv6_nets": [],
         "network_id": nid}))


@pytest.fixture(scope="module")
def host(make_host):
    return make_host("rc")


@pytest.fixture(scope="module")
def plugin(host, etcd_url):
    store(host, etcd_url, "put", f"/calico/v1/ipam/v4/pool/{POOL.replace('/', '-')}",
          json.dumps({"cidr": POOL}))
    config = etcd_config(etcd_url, host.name, docker_endpoint=f"unix://{host.sock}",
                         docker_timeout=10.0, audit_interval=1.0, audit_grace=1.0)
    # host-local state under the lab host's directory, not the machine's /run
    config = config.replace("[datastore]", f'state_dir = "{host.dir}/run"\n[datastore]', 1)
    proc = PluginProcess(host, config).start()
    assert wait_for(lambda: "start-up audit done" in proc.log(), 30), proc.log()[-3000:]
    host.docker("network", "create", "--driver=calico", "--ipam-driver=calico", "rnet")
    yield proc
    names = host.docker("ps", "-aq").stdout.split()
    if names:
        host.docker("rm", "-f", *names, check=False)
    host.docker("network", "rm", "rnet", check=False)
    proc.stop()
    store(host, etcd_url, "rmtree", "/calico")


def test_periodic_reconciler_cleans_planted_leaks_and_keeps_live_containers(
        host, plugin, etcd_url):
    d = host.docker
    d("run", "-d", "--net", "rnet", "--name", "r1", "busybox", "sleep", "1d")
    d("run", "-d", "--net", "rnet", "--name", "r2", "busybox", "sleep", "1d")
    ips = {n: container_ip(host, n, "rnet") for n in ("r1", "r2")}
    live = records(host, etcd_url)
    assert len(live) == 2
    nid = d("network", "inspect", "-f", "{{.Id}}", "rnet").stdout.strip()

    # a failed DeleteEndpoint: the record (with its Calico IPAM address) stays,
    # the veth is gone, Docker does not know the endpoint
    stale_eid = "dead" * 16
    stale_ip = store(host, etcd_url, "assign", host.name).strip()
    plant_endpoint(host, etcd_url, stale_eid, nid, stale_ip)
    # a removed host: netpluginctl host remove releases its block, then its
    # dying plugin writes one more affinity (a new block) after the removal
    ghost_ip = store(host, etcd_url, "assign", GHOST).strip()
    store(host, etcd_url, "put", f"/calico/v1/host/{GHOST}/bird_ip", "10.255.0.9")
    out = host.run(CTL, "-f", plugin.config_path, "--json",
                   "host", "remove", GHOST).stdout
    done = json.loads(out)
    assert done["addresses_released"] == [ghost_ip], done
    assert affinities(host, etcd_url, GHOST) == []
    late_ip = store(host, etcd_url, "assign", GHOST).strip()
    assert affinities(host, etcd_url, GHOST), "the planted affinity"
    # Calico CNI's kind of veth: cali + 11 hex characters, no marker, no record
    host.run("ip", "link", "add", "cali5ca1ab1e000", "type", "veth",
             "peer", "name", "tmp5ca1ab1e000")

    def cleaned():
        return (stale_eid not in records(host, etcd_url)
                and stale_ip not in allocated(host, etcd_url)
                and not affinities(host, etcd_url, GHOST)
                and late_ip not in allocated(host, etcd_url))
    assert wait_for(cleaned, 40), plugin.log()[-4000:]

    # live containers: records, addresses and traffic unchanged
    assert records(host, etcd_url) == live
    assert {n: container_ip(host, n, "rnet") for n in ("r1", "r2")} == ips
    assert {ips["r1"], ips["r2"]} <= allocated(host, etcd_url)
    assert ping(host, "r1", ips["r2"]) and ping(host, "r2", ips["r1"])
    # the unmarked veth is left alone; ours still exist
    names = links(host)
    assert {"cali5ca1ab1e000", "tmp5ca1ab1e000"} <= names
    assert {"cali" + e[:11] for e in live} <= names
    log = plugin.log()
    assert f"audit: removed endpoint {stale_eid}" in log
    assert "device cali5ca1ab1e000: not marked as created by netplugin" in log
    assert "Traceback" not in log
    host.run("ip", "link", "del", "cali5ca1ab1e000")


def test_nothing_removed_while_docker_is_down_and_cleaned_when_it_is_back(
        host, plugin, etcd_url):
    d = host.docker
    d("run", "-d", "--net", "rnet", "--name", "s1", "busybox", "sleep", "1d")
    nid = d("network", "inspect", "-f", "{{.Id}}", "rnet").stdout.strip()
    host.stop_dockerd()
    try:
        stale_eid = "beef" * 16
        stale_ip = store(host, etcd_url, "assign", host.name).strip()
        plant_endpoint(host, etcd_url, stale_eid, nid, stale_ip)
        # Docker unreachable: the runs back off (logged once), nothing is removed
        assert wait_for(lambda: "retrying in" in plugin.log(), 30), plugin.log()[-3000:]
        time.sleep(4)                 # a few intervals and grace periods
        assert stale_eid in records(host, etcd_url)
        assert stale_ip in allocated(host, etcd_url)
    finally:
        host.start_dockerd()
    assert wait_for(lambda: stale_eid not in records(host, etcd_url)
                    and stale_ip not in allocated(host, etcd_url), 60), plugin.log()[-4000:]
    assert "calico audit: succeeded again" in plugin.log()
