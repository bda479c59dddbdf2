"""``make bench``: the standing speed targets, measured side by side in one run.

In one lab host (a network namespace with its own dockerd, see tests/lab.py):
- ``docker run --rm busybox true`` on a calico network vs on a Docker bridge
  network, alternating, ROUNDS times each: the calico median must be within
  10 % of the bridge median;
- a burst of 10 parallel ``docker run -d`` on each: calico's wall time within
  25 % of the bridge's.

Prints a table and exits 1 when a target is missed.  Never part of `make test`.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tests.lab import Lab
from tests.plugin_proc import PluginProcess

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "10"))
BURST = 10
RUN_TARGET = 1.10
BURST_TARGET = 1.25

CONFIG = """
backend = "calico"
log_level = "warning"
[datastore]
type = "embedded"
path = "{path}"
[calico]
hostname = "bench"
"""


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


def main() -> int:
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
        plugin.stop()

    run_b, run_c = statistics.median(runs["brnet"]), statistics.median(runs["calnet"])
    burst_b, burst_c = statistics.median(bursts["brnet"]), statistics.median(bursts["calnet"])
    rows = [
        ("docker run --rm (median of %d)" % ROUNDS, run_b, run_c, RUN_TARGET),
        ("%d x docker run -d in parallel (median of 3)" % BURST, burst_b, burst_c, BURST_TARGET),
    ]
    print(f"{'measure':45} {'bridge':>9} {'calico':>9} {'ratio':>7} {'target':>7}")
    failed = False
    for name, b, c, target in rows:
        ratio = c / b
        ok = ratio <= target
        failed |= not ok
        print(f"{name:45} {b:8.3f}s {c:8.3f}s {ratio:7.2f} {'<=' + str(target):>7} "
              f"{'ok' if ok else 'MISSED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
