"""Dual-stack calico networks on one lab host, on every Docker version of the
lab: three ``--ipv6`` networks created back to back, two containers on each
started at once; every container must start (Docker >= 26 checks for a
direct route to the ``fe80::1`` gateway before the kernel's fe80::/64 exists:
Join's on-link fe80::1/128 is what it finds), has its default routes via
169.254.1.1 and fe80::1, and reaches its peer over IPv4 and IPv6, not the
other networks' containers.  Repeated, since the failure was a race (4 of 5
runs on Docker 26 before the fix), with Docker's IPAM and with Calico IPAM.
Nothing stays in etcd afterwards."""
import json

import pytest

from tests.plugin_proc import ROOT, PluginProcess, etcd_config, etcd_items

pytestmark = pytest.mark.integration

ROUNDS = {"docker": 3, "calico": 2}
NETWORKS = 3
POOL = "10.62.0.0/16"
POOL6 = "fd80:62::/64"


@pytest.fixture(scope="module")
def host(make_host):
    return make_host("ds")


@pytest.fixture(scope="module")
def plugin(host, etcd_url):
    proc = PluginProcess(host, etcd_config(etcd_url, host.name)).start()
    for cidr in (POOL, POOL6):
        ctl(proc, "pool", "add", cidr)
    yield proc
    for cidr in (POOL, POOL6):
        ctl(proc, "pool", "remove", cidr, check=False)
    proc.stop()


def ctl(proc, *args, check=True):
    return proc.host.run(f"{ROOT}/netpluginctl", "-f", proc.config_path, *args, check=check)


def addresses(host, name, network):
    out = host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout
    info = json.loads(out)[network]
    return info["IPAddress"], info["GlobalIPv6Address"]


def ping(host, container, ip):
    return host.docker("exec", container, "ping", "-c1", "-W2", ip, check=False).returncode == 0


def run_round(host, calico_ipam):
    """Create NETWORKS dual-stack networks, then 2 containers on each, back to
    back; check every container; remove everything.  Returns the failures."""
    d = host.docker
    nets = [f"ds{i}" for i in range(NETWORKS)]
    names = {net: [f"{net}a", f"{net}b"] for net in nets}
    failures = []
    try:
        for i, net in enumerate(nets):
            if calico_ipam:
                d("network", "create", "--driver=calico", "--ipam-driver=calico", "--ipv6",
                  net)
            else:
                d("network", "create", "--driver=calico", "--ipv6",
                  f"--subnet=192.168.{40 + i}.0/24", f"--subnet=fd00:40:{i}::/64", net)
        for net in nets:
            for name in names[net]:
                r = d("run", "-d", "--net", net, "--name", name, "busybox", "sleep", "1d",
                      check=False)
                if r.returncode != 0:
                    failures.append(f"{name} did not start: {r.stderr.strip()}")
        if failures:
            return failures
        ips = {name: addresses(host, name, net) for net in nets for name in names[net]}
        for net in nets:
            a, b = names[net]
            for name in (a, b):
                v4, v6 = ips[name]
                assert v4 and v6, (name, ips[name])
                routes6 = d("exec", name, "ip", "-6", "route").stdout
                assert "default via fe80::1 dev eth0" in routes6, routes6
                routes4 = d("exec", name, "ip", "route").stdout
                assert "default via 169.254.1.1 dev eth0" in routes4, routes4
            for src, dst in ((a, b), (b, a)):
                for ip in ips[dst]:
                    if not ping(host, src, ip):
                        failures.append(f"{src} -> {dst} {ip} failed")
        # another network's container: closed, IPv4 and IPv6
        other = names[nets[1]][0]
        for ip in ips[other]:
            if ping(host, names[nets[0]][0], ip):
                failures.append(f"{names[nets[0]][0]} reached {other} {ip} across networks")
        return failures
    finally:
        d("rm", "-f", *[n for net in nets for n in names[net]], check=False)
        d("network", "rm", *nets, check=False)


@pytest.mark.parametrize("ipam", ["docker", "calico"])
def test_three_dual_stack_networks_back_to_back(host, plugin, etcd_url, ipam):
    for round_ in range(ROUNDS[ipam]):
        failures = run_round(host, calico_ipam=ipam == "calico")
        assert not failures, f"round {round_ + 1}: " + "; ".join(failures)
    # Left: the Calico pools of the fixture, and (Calico IPAM) the blocks
    # this host claimed, affine to it, with no address allocated any more.
    ours = {f"/calico/v1/ipam/v4/pool/{POOL.replace('/', '-')}",
            f"/calico/v1/ipam/v6/pool/{POOL6.replace('/', '-')}"}
    left = {}
    for key, value in etcd_items(host, etcd_url).items():
        if key in ours or key.startswith(f"/calico/ipam/v2/host/{host.name}/"):
            continue
        if key.startswith("/calico/ipam/v2/assignment/"):
            block = json.loads(value)
            if block.get("affinity") == f"host:{host.name}" and \
                    not any(a is not None for a in block["allocations"]):
                continue
        left[key] = value
    assert left == {}, left
    log = plugin.log()
    assert "Traceback" not in log, log[-5000:]
