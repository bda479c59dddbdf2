"""``make bench``: the standing speed targets, measured side by side in one run.

In one lab host (a network namespace with its own dockerd, see tests/lab/):
- ``docker run --rm busybox true`` on a calico network vs on a Docker bridge
  network, alternating, ROUNDS times each: the calico median must be within
  10 % of the bridge median;
- a burst of 10 parallel ``docker run -d`` on each: calico's wall time within
  25 % of the bridge's;
- start-up: from starting ``./plugin`` to its first answered Plugin.Activate
  (median of 3 starts, goal <= 1 s);
- memory: the RSS of all of the plugin's processes together after 400
  endpoints were created and joined through the plugin's API (each a veth
  pair and routes, as for a container; goal <= 80 MB).

- on a 3-member etcd cluster (one member per lab host) with the `etcdv3`
  datastore and two plugin hosts: IPAM allocations per second through the
  plugins' IPAM API (RequestAddress), 2 hosts x 8 concurrent clients, 0
  duplicates (goal >= 500/s), and per-call p50/p99 of CreateEndpoint and Join
  (goal p99 <= 10 ms).

Prints a table and exits 1 when a target is missed.  Never part of `make test`.
``BENCH_ONLY=etcdv3`` runs the etcdv3 figures only.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tests.lab import Lab
from tests.lab.etcd import EtcdCluster
from tests.plugin_proc import LAUNCHER, LabStore, PluginProcess, etcd_config

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "10"))
BURST = 10
RUN_TARGET = 1.10
BURST_TARGET = 1.25
STARTUP_TARGET = 1.0          # seconds to the first answered Activate
ENDPOINTS = int(os.environ.get("BENCH_ENDPOINTS", "400"))
RSS_TARGET = 80.0             # MB, all plugin processes together

CONFIG = """
backend = "calico"
log_level = "warning"
[datastore]
type = "embedded"
path = "{path}"
[calico]
hostname = "bench"
"""


IPAM_CLIENTS = 8               # concurrent clients per plugin host
IPAM_PER_CLIENT = int(os.environ.get("BENCH_IPAM_PER_CLIENT", "60"))
IPAM_TARGET = 500.0           # allocations per second, 2 hosts together
LATENCY_ENDPOINTS = int(os.environ.get("BENCH_LATENCY_ENDPOINTS", "200"))
LATENCY_TARGET = 10.0         # ms, p99 of CreateEndpoint and of Join on etcdv3


def _ok(plugin, path, body):
    status, answer = plugin.call(path, body)
    if status != 200:
        raise RuntimeError(f"{path} failed: {answer}")
    return answer


def _p(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def etcdv3_figures(lab):
    """(allocations/s, duplicates, {call: (p50 ms, p99 ms)}) on a 3-member cluster."""
    a, b = lab.add_host("b3a"), lab.add_host("b3b")
    c = lab.add_host("b3c")
    for h in (a, b):
        h.start_dockerd()
    cluster = EtcdCluster([a, b, c])
    cluster.start()
    leader = cluster.leader()
    endpoints = [leader.url] + [m.url for m in cluster.members if m is not leader]
    url = LabStore(endpoints[0], "etcdv3", endpoints)
    plugins = []
    for h in (a, b):
        text = etcd_config(url, h.name, "local", ip=h.addr).replace(
            'log_level = "info"\n', 'log_level = "warning"\nthreads = 16\n')
        plugins.append(PluginProcess(h, text).start())
    a.run(LAUNCHER.replace("/plugin", "/netpluginctl"), "-f", plugins[0].config_path,
          "pool", "add", "10.70.0.0/16", timeout=60)
    pools = [_ok(p, "/IpamDriver.RequestPool", {
        "AddressSpace": "CalicoLocalAddressSpace", "Pool": "", "SubPool": "", "Options": {},
        "V6": False})["PoolID"] for p in plugins]

    def client(index):
        plugin, pool = plugins[index % 2], pools[index % 2]
        return [(plugin, pool, _ok(plugin, "/IpamDriver.RequestAddress",
                                   {"PoolID": pool, "Address": "", "Options": {}})["Address"])
                for _ in range(IPAM_PER_CLIENT)]

    with ThreadPoolExecutor(2 * IPAM_CLIENTS) as pool:
        start = time.perf_counter()
        got = [x for chunk in pool.map(client, range(2 * IPAM_CLIENTS)) for x in chunk]
        elapsed = time.perf_counter() - start
    addresses = [addr for _, _, addr in got]
    rate = len(addresses) / elapsed
    duplicates = len(addresses) - len(set(addresses))
    with ThreadPoolExecutor(2 * IPAM_CLIENTS) as pool:
        list(pool.map(lambda x: _ok(x[0], "/IpamDriver.ReleaseAddress",
                                    {"PoolID": x[1], "Address": x[2].split("/")[0]}), got))

    plugin = plugins[0]
    nid = "d" * 64
    _ok(plugin, "/NetworkDriver.CreateNetwork", {
        "NetworkID": nid, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "10.201.0.0/16",
                      "Gateway": "10.201.0.1/16"}], "IPv6Data": []})
    times = {"CreateEndpoint": [], "Join": []}
    eids = []
    for i in range(LATENCY_ENDPOINTS):
        eid = f"{i:08x}" + "c" * 56
        ip = f"10.201.{2 + i // 250}.{1 + i % 250}"
        for name, body in (("CreateEndpoint", {
                "NetworkID": nid, "EndpointID": eid, "Options": {},
                "Interface": {"Address": f"{ip}/16", "AddressIPv6": "", "MacAddress": ""}}),
                ("Join", {"NetworkID": nid, "EndpointID": eid,
                          "SandboxKey": f"/var/run/docker/netns/c{i}", "Options": {}})):
            start = time.perf_counter()
            _ok(plugin, "/NetworkDriver." + name, body)
            times[name].append((time.perf_counter() - start) * 1000)
        eids.append(eid)
    for eid in eids:
        plugin.call("/NetworkDriver.Leave", {"NetworkID": nid, "EndpointID": eid})
        plugin.call("/NetworkDriver.DeleteEndpoint", {"NetworkID": nid, "EndpointID": eid})
    plugin.call("/NetworkDriver.DeleteNetwork", {"NetworkID": nid})
    for p in plugins:
        p.stop()
    cluster.stop()
    latency = {name: (_p(v, 0.50), _p(v, 0.99)) for name, v in times.items()}
    return rate, duplicates, latency


def print_etcdv3(rate, duplicates, latency) -> bool:
    """The etcdv3 rows of the table; True when a goal was missed."""
    failed = False
    ok = rate >= IPAM_TARGET and duplicates == 0
    failed |= not ok
    name = f"etcdv3: IPAM allocations/s, 2 hosts x {IPAM_CLIENTS} clients"
    print(f"{name:52} {'':>9} {'':>9} {rate:6.0f}/s {'>=' + str(int(IPAM_TARGET)) + '/s':>8} "
          f"{'ok' if ok else 'MISSED'} ({duplicates} duplicates)")
    for call, (p50, p99) in latency.items():
        ok = p99 <= LATENCY_TARGET
        failed |= not ok
        name = f"etcdv3: {call} p50 {p50:.1f} ms, p99"
        print(f"{name:52} {'':>9} {'':>9} {p99:6.1f}ms {'<=' + str(int(LATENCY_TARGET)) + 'ms':>8} "
              f"{'ok' if ok else 'MISSED'}")
    return failed


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run_rm(host, net):
    host.docker("run", "--rm", "--net", net, "busybox", "true")


def burst(host, net, tag):
    names = [f"{tag}{i}" for i in range(BURST)]
    with ThreadPoolExecutor(BURST) as pool:
        start = time.perf_counter()
        list(pool.map(lambda n: host.docker("run", "-d", "--net", net, "--name", n,
                                            "busybox", "sleep", "600"), names))
        elapsed = time.perf_counter() - start
    host.docker("rm", "-f", *names)
    return elapsed


def startup_seconds(host, config_text) -> float:
    """Median time from spawning ./plugin to its first answered Activate."""
    times = []
    for _ in range(3):
        proc = PluginProcess(host, config_text)
        start = time.perf_counter()
        proc.start(poll=0.01)
        times.append(time.perf_counter() - start)
        proc.stop()
    return statistics.median(times)


def process_tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and all its descendants, in MB."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def rss_with_endpoints(plugin, count: int) -> float:
    nid = "f" * 64
    plugin.call("/NetworkDriver.CreateNetwork", {
        "NetworkID": nid, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "10.200.0.0/16",
                      "Gateway": "10.200.0.1/16"}], "IPv6Data": []})
    eids = []
    for i in range(count):
        eid = f"{i:08x}" + "e" * 56
        ip = f"10.200.{2 + i // 250}.{1 + i % 250}"
        for path, body in (("/NetworkDriver.CreateEndpoint", {
                "NetworkID": nid, "EndpointID": eid, "Options": {},
                "Interface": {"Address": f"{ip}/16", "AddressIPv6": "", "MacAddress": ""}}),
                ("/NetworkDriver.Join", {"NetworkID": nid, "EndpointID": eid,
                                          "SandboxKey": f"/var/run/docker/netns/b{i}",
                                          "Options": {}})):
            status, answer = plugin.call(path, body)
            if status != 200:
                raise RuntimeError(f"{path} failed: {answer}")
        eids.append(eid)
    time.sleep(5)                  # let the agent apply the policy for all of them
    rss = process_tree_rss_mb(plugin.proc.pid)
    for eid in eids:
        plugin.call("/NetworkDriver.Leave", {"NetworkID": nid, "EndpointID": eid})
        plugin.call("/NetworkDriver.DeleteEndpoint", {"NetworkID": nid, "EndpointID": eid})
    plugin.call("/NetworkDriver.DeleteNetwork", {"NetworkID": nid})
    return rss


def main() -> int:
    if os.environ.get("BENCH_ONLY") == "etcdv3":
        with Lab.create() as lab:
            figures = etcdv3_figures(lab)
        print(f"{'measure':52} {'':>9} {'':>9} {'figure':>8} {'goal':>8}")
        return 1 if print_etcdv3(*figures) else 0
    with Lab.create() as lab:
        host = lab.add_host("bench")
        host.start_dockerd()
        plugin = PluginProcess(host, CONFIG.format(path=os.path.join(host.dir, "state.db")))
        plugin.start()
        host.docker("network", "create", "-d", "bridge", "--subnet=192.168.100.0/24", "brnet")
        host.docker("network", "create", "-d", "calico", "--subnet=192.168.101.0/24", "calnet")
        for net in ("brnet", "calnet"):  # warm-up (image layers, first plugin call)
            run_rm(host, net)

        runs = {"brnet": [], "calnet": []}
        for i in range(ROUNDS):
            order = ("brnet", "calnet") if i % 2 == 0 else ("calnet", "brnet")
            for net in order:
                runs[net].append(timed(run_rm, host, net))
        bursts = {"brnet": [], "calnet": []}
        for i in range(3):
            order = ("brnet", "calnet") if i % 2 == 0 else ("calnet", "brnet")
            for net in order:
                bursts[net].append(burst(host, net, f"b{net[:2]}{i}x"))
        rss = rss_with_endpoints(plugin, ENDPOINTS)
        plugin.stop()
        startup = startup_seconds(host, CONFIG.format(path=os.path.join(host.dir, "s.db")))
        figures = etcdv3_figures(lab)

    run_b, run_c = statistics.median(runs["brnet"]), statistics.median(runs["calnet"])
    burst_b, burst_c = statistics.median(bursts["brnet"]), statistics.median(bursts["calnet"])
    rows = [
        ("docker run --rm (median of %d)" % ROUNDS, run_b, run_c, RUN_TARGET),
        ("%d x docker run -d in parallel (median of 3)" % BURST, burst_b, burst_c, BURST_TARGET),
    ]
    print(f"{'measure':52} {'bridge':>9} {'calico':>9} {'figure':>8} {'goal':>8}")
    failed = False
    for name, b, c, target in rows:
        ratio = c / b
        ok = ratio <= target
        failed |= not ok
        print(f"{name:52} {b:8.3f}s {c:8.3f}s {ratio:8.2f} {'<=' + str(target):>8} "
              f"{'ok' if ok else 'MISSED'}")
    for name, figure, unit, target in (
            ("start-up to the first answered Activate (median of 3)", startup, "s",
             STARTUP_TARGET),
            (f"RSS of all plugin processes, {ENDPOINTS} endpoints joined", rss, "MB",
             RSS_TARGET)):
        ok = figure <= target
        failed |= not ok
        print(f"{name:52} {'':>9} {'':>9} {figure:6.2f}{unit:>2} {'<=' + str(target) + unit:>8} "
              f"{'ok' if ok else 'MISSED'}")
    failed |= print_etcdv3(*figures)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
