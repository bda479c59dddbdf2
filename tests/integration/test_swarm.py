"""Swarm: netplugin as a managed plugin on a manager and a worker (dockerd 26,
etcd, scope global), swarm-scoped Calico networks and services across both.

Docker drives the IPAM driver twice for a swarm network: the manager
allocates every address (RequestPool in the global address space), and each
node where a task lands asks again, in the local address space, for exactly
the address the manager chose.  The tests check that each address is handed
out once and freed once, that tasks reach each other across hosts, that two
swarm networks are isolated, and that nothing is left afterwards."""
import json
import os
import signal

import pytest

from tests.plugin_proc import ROOT, etcd_config, etcd_items, store, wait_until
from tests.integration.test_managed_plugin import PLUGIN

pytestmark = [pytest.mark.integration, pytest.mark.docker_versions("26")]

POOL = "10.80.0.0/16"


def _ctl(host, conf, *args, check=True):
    return host.run(os.path.join(ROOT, "netpluginctl"), "-f", os.path.join(conf, "config.cfg"),
                    *args, check=check)




@pytest.fixture(scope="module")
def swarm(make_host, managed_plugin_dir, etcd_url):
    # (the lab's dockerd runs with DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1: no pulls)
    manager = make_host("swm")
    worker = make_host("sww")
    confs = {}
    for host in (manager, worker):
        conf = os.path.join(host.dir, "netplugin-etc")
        os.makedirs(conf, exist_ok=True)
        with open(os.path.join(conf, "config.cfg"), "w") as f:
            # Both nodes may report one host name: the Calico one is configured.
            f.write(etcd_config(etcd_url, "node-" + host.name, scope="global"))
        confs[host.name] = conf
        host.docker("plugin", "create", PLUGIN, managed_plugin_dir, timeout=300)
        host.docker("plugin", "set", PLUGIN, f"config.source={conf}")
        host.docker("plugin", "enable", PLUGIN, timeout=120)
    manager.docker("swarm", "init", "--advertise-addr", manager.addr,
                   "--listen-addr", f"{manager.addr}:2377")
    token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
    worker.docker("swarm", "join", "--token", token, "--advertise-addr", worker.addr,
                  f"{manager.addr}:2377")
    _ctl(manager, confs[manager.name], "pool", "add", POOL)
    try:
        yield manager, worker, confs
    finally:
        for name in ("web", "api"):
            manager.docker("service", "rm", name, check=False)
        for net in ("snet1", "snet2"):
            manager.docker("network", "rm", net, check=False)
        worker.docker("swarm", "leave", "--force", check=False)
        manager.docker("swarm", "leave", "--force", check=False)
        for host in (worker, manager):
            host.docker("rm", "-f", "attached", check=False)
            host.docker("plugin", "disable", "-f", PLUGIN, check=False)
            host.docker("plugin", "rm", "-f", PLUGIN, check=False)
        _ctl(manager, confs[manager.name], "pool", "remove", POOL, check=False)


def _plugin_pids(host):
    """PIDs of the managed plugin's server processes in ``host``'s network
    namespace (the lowest is the gunicorn master)."""
    want = os.stat(host.netns_path).st_ino
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            if b"netplugin.sock" in cmd and os.stat(f"/proc/{entry}/ns/net").st_ino == want:
                pids.append(int(entry))
        except OSError:
            continue
    return sorted(pids)


def _tasks(hosts, service):
    """{container id: (host, {network: ip})} of the running tasks of ``service``."""
    out = {}
    for host in hosts:
        ids = host.docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}"
                          ).stdout.split()
        for cid in ids:
            nets = json.loads(host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                          cid).stdout)
            out[cid] = (host, {n: v["IPAddress"] for n, v in nets.items()})
    return out


def _allocations(host, url):
    """Every allocated address in the Calico IPAM blocks -> its handle."""
    blocks = json.loads(store(host, url, "list", "/calico/ipam/v2/assignment"))
    found = {}
    import ipaddress
    for key, value in blocks.items():
        block = json.loads(value)
        net = ipaddress.ip_network(block["cidr"])
        for ordinal, attr in enumerate(block["allocations"]):
            if attr is not None:
                handle = block["attributes"][attr].get("handle_id")
                found[str(net[ordinal])] = handle
    return found


def test_services_on_swarm_networks_across_hosts(swarm, etcd_url):
    manager, worker, confs = swarm
    hosts = (manager, worker)
    for net in ("snet1", "snet2"):
        manager.docker("network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN,
                       "--scope", "swarm", "--attachable", net)
    manager.docker("service", "create", "-d", "--name", "web", "--replicas", "4",
                   "--network", "snet1", "--no-resolve-image", "--stop-grace-period", "1s",
                   "busybox", "sleep", "1d")
    manager.docker("service", "create", "-d", "--name", "api", "--replicas", "2",
                   "--network", "snet2", "--no-resolve-image", "--stop-grace-period", "1s",
                   "busybox", "sleep", "1d")
    web = wait_until(lambda: (lambda t: t if len(t) == 4 else None)(_tasks(hosts, "web")),
                timeout=90, what="4 running web tasks")
    api = wait_until(lambda: (lambda t: t if len(t) == 2 else None)(_tasks(hosts, "api")),
                timeout=90, what="2 running api tasks")
    placed = {h.name for h, _ in web.values()}
    assert placed == {manager.name, worker.name}, f"web tasks only on {placed}"
    web_ips = [nets["snet1"] for _, nets in web.values()]
    api_ips = [nets["snet2"] for _, nets in api.values()]
    assert len(set(web_ips + api_ips)) == 6, web_ips + api_ips
    assert all(ip.startswith("10.80.") for ip in web_ips + api_ips)

    # Across hosts within snet1.
    by_host = {}
    for cid, (host, nets) in web.items():
        by_host.setdefault(host.name, []).append((host, cid, nets["snet1"]))
    (h_m, c_m, ip_m), (h_w, c_w, ip_w) = by_host[manager.name][0], by_host[worker.name][0]
    wait_until(lambda: h_m.docker("exec", c_m, "ping", "-c1", "-W1", ip_w, check=False
                             ).returncode == 0, timeout=30, what="manager task -> worker task")
    h_w.docker("exec", c_w, "ping", "-c1", "-W2", ip_m)

    # An attachable container on the worker reaches a task on the manager.
    worker.docker("run", "-d", "--name", "attached", "--network", "snet1", "busybox",
                  "sleep", "1d")
    wait_until(lambda: worker.docker("exec", "attached", "ping", "-c1", "-W1", ip_m, check=False
                                ).returncode == 0, timeout=30, what="attached -> manager task")

    # snet2 is isolated from snet1, both ways, across hosts too.
    api_host, api_cid, api_ip = next((h, c, n["snet2"]) for c, (h, n) in api.items())
    assert api_host.docker("exec", api_cid, "ping", "-c1", "-W2", ip_m, check=False
                           ).returncode != 0
    assert api_host.docker("exec", api_cid, "ping", "-c1", "-W2", ip_w, check=False
                           ).returncode != 0
    assert h_m.docker("exec", c_m, "ping", "-c1", "-W2", api_ip, check=False).returncode != 0

    # Every running container has its address allocated exactly once.
    allocated = _allocations(manager, etcd_url)
    attached_ip = json.loads(worker.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                           "attached").stdout)["snet1"]["IPAddress"]
    for ip in web_ips + api_ips + [attached_ip]:
        assert ip in allocated, f"{ip} is not allocated in Calico IPAM"

    # Killing the plugin inside the managed plugin: Docker restarts it, tasks
    # keep their network, and a new container still gets one.
    pids = _plugin_pids(worker)
    assert pids, "the managed plugin's process was not found on the worker"
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: _plugin_pids(worker) and worker.docker("run", "--rm", "--network", "snet1", "busybox", "ping", "-c1",
                            "-W2", ip_m, check=False).returncode == 0,
          timeout=60, what="the plugin restarted by Docker and a new container reaching a task")
    h_w.docker("exec", c_w, "ping", "-c1", "-W2", ip_m)

    # Removal leaves nothing: no endpoint, no allocation, no veth anywhere.
    worker.docker("rm", "-f", "attached")
    manager.docker("service", "rm", "web", "api")
    for net in ("snet1", "snet2"):
        wait_until(lambda net=net: manager.docker("network", "rm", net, check=False).returncode == 0,
              timeout=60, what=f"network rm {net}")

    left = {}

    def clean():
        items = etcd_items(manager, etcd_url)
        left["endpoints"] = [k for k in items if "/endpoint/" in k]
        left["profiles"] = [k for k in items if "/policy/profile/" in k]
        # network records and the per-host profile references
        left["networks"] = [k for k in items if k.startswith("/calico/libnetwork/")]
        left["veths"] = [h.name for h in hosts if "cali" in h.run("ip", "-o", "link").stdout]
        left["allocations"] = _allocations(manager, etcd_url)
        return not any(left.values())
    try:
        wait_until(clean, timeout=60,
                   what="no endpoint, profile, network record, allocation or veth left")
    except AssertionError:
        raise AssertionError(f"left after removal: {left}") from None
    for host in hosts:
        wait_until(lambda host=host: host.docker("plugin", "disable", PLUGIN, check=False
                                            ).returncode == 0,
              timeout=60, what=f"plugin disable on {host.name}")
        host.docker("plugin", "rm", PLUGIN)
