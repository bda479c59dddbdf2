"""Two lab hosts, one Calico network fabric, no IPIP/VXLAN: each dockerd has the
lab etcd as its cluster store (global-scope networks), each host runs the
real plugin (scope "global", etcd datastore) whose agent publishes the host's
bird_ip and routes the other host's blocks / endpoints via it
(backends/calico/routes.py).  The Calico libnetwork demo, end to end:

    pool 192.168.0.0/16; net1, net2, net3 (created on host A)
    host A: workload-A (net1), workload-B (net2), workload-C (net1)
    host B: workload-D (net3), workload-E (net1)
    A, C, E ping each other; B and D reach nobody and nobody reaches them;
    everything removed: no endpoint, allocation, route or device left.
"""
import json

import pytest

from tests.plugin_proc import LAUNCHER, PluginProcess, container_ip, etcd_config, store
from tests.waiting import wait_for

# --cluster-store is gone since Docker 23
pytestmark = [pytest.mark.integration, pytest.mark.docker_versions("20.10")]

STORE = "10.99.0.2:2379"
DOCKERD_ARGS = (f"--cluster-store=etcd://{STORE}", "--cluster-advertise=eth0:2376")
CTL = LAUNCHER.replace("/plugin", "/netpluginctl")
POOL = "192.168.0.0/16"
PROTO = "78"   # routes.RTPROT_NETPLUGIN



def etcd_items(host, url, prefix="/calico"):
    """Every key under ``prefix``, the hosts' bird_ip included."""
    return json.loads(store(host, url, "list", prefix))


def our_routes(host):
    return host.run("ip", "-4", "route", "show", "proto", PROTO).stdout.strip()


def cali_links(host):
    return [line for line in host.run("ip", "-o", "link", "show").stdout.splitlines()
            if ": cali" in line]



def ping(host, container, ip, wait=2):
    return host.docker("exec", container, "ping", "-c1", f"-W{wait}", ip,
                       check=False).returncode == 0


def ctl(host, cfg_path, *args):
    return host.run(CTL, "-f", cfg_path, *args, timeout=60)


@pytest.fixture(scope="module")
def fabric(make_host, etcd_url):
    a = make_host("ma", dockerd_args=DOCKERD_ARGS)
    b = make_host("mb", dockerd_args=DOCKERD_ARGS)
    plugins = []
    for h in (a, b):
        proc = PluginProcess(h, etcd_config(etcd_url, h.name, "global", ip=h.addr))
        proc.start()
        plugins.append(proc)
    yield a, b, plugins
    for proc in plugins:
        proc.stop()


def _dump_state(a, b, plugins, etcd_url):
    out = []
    for h, p in zip((a, b), plugins):
        out.append(f"--- {h.name} routes\n" + h.run("ip", "-4", "route").stdout)
        out.append(f"--- {h.name} plugin log (tail)\n" + "\n".join(p.log().splitlines()[-40:]))
    out.append("--- etcd /calico\n" + json.dumps(etcd_items(a, etcd_url), indent=1)[:6000])
    return "\n".join(out)


def _demo(fabric, etcd_url, calico_ipam, subnets=()):
    a, b, plugins = fabric
    cfg = plugins[0].config_path
    nets = ["net1", "net2", "net3"]
    if calico_ipam:
        ctl(a, cfg, "pool", "add", POOL)
    placement = {"wa": (a, "net1"), "wb": (a, "net2"), "wc": (a, "net1"),
                 "wd": (b, "net3"), "we": (b, "net1")}
    try:
        for i, net in enumerate(nets):
            args = (["--ipam-driver", "calico"] if calico_ipam
                    else [f"--subnet={subnets[i]}"])
            a.docker("network", "create", "--driver", "calico", *args, net)
        # Global scope: host B's dockerd learns the networks from the cluster store.
        assert wait_for(lambda: set(nets) <= set(
            b.docker("network", "ls", "--format", "{{.Name}}").stdout.split()), 30), \
            b.docker("network", "ls").stdout
        nid = a.docker("network", "inspect", "-f", "{{.Id}}", "net1").stdout.strip()
        assert b.docker("network", "inspect", "-f", "{{.Id}} {{.Scope}}",
                        "net1").stdout.split() == [nid, "global"]

        for name, (host, net) in placement.items():
            host.docker("run", "-d", "--net", net, "--name", name, "busybox", "sleep", "1d")
        ips = {name: container_ip(host, name, net) for name, (host, net) in placement.items()}
        assert len(set(ips.values())) == 5, ips

        if calico_ipam:
            # Each host owns a block of the pool; the other routes it via bird_ip.
            affinities = etcd_items(a, etcd_url, "/calico/ipam/v2/host")
            assert any("/ma/ipv4/block/" in k for k in affinities), affinities
            assert any("/mb/ipv4/block/" in k for k in affinities), affinities
        # (hosts of other test modules sharing this etcd may have published too)
        birds = {k: v for k, v in etcd_items(a, etcd_url, "/calico/v1/host").items()
                 if k.endswith("/bird_ip") and k.split("/")[4] in ("ma", "mb")}
        assert birds == {"/calico/v1/host/ma/bird_ip": a.addr,
                         "/calico/v1/host/mb/bird_ip": b.addr}
        assert wait_for(lambda: f"via {b.addr}" in our_routes(a)
                        and ips["we"] in _covered(our_routes(a), ips["we"])), \
            _dump_state(a, b, plugins, etcd_url)
        assert wait_for(lambda: f"via {a.addr}" in our_routes(b)
                        and _covered(our_routes(b), ips["wa"])), \
            _dump_state(a, b, plugins, etcd_url)

        # The operator's view: netpluginctl status on host A names both hosts
        # and the routes towards B; endpoint show lists all five workloads.
        st = json.loads(ctl(a, cfg, "--json", "status").stdout)
        assert st["ok"] is True, st
        assert {(h["host"], h["ip"]) for h in st["hosts"]} >= {("ma", a.addr), ("mb", b.addr)}
        assert st["cross_host_routes"] and all(
            r["via"] == b.addr for r in st["cross_host_routes"]), st["cross_host_routes"]
        eps = json.loads(ctl(a, cfg, "--json", "endpoint", "show").stdout)
        assert {e["hostname"]: e["endpoints"] for e in eps} == {"ma": 3, "mb": 2}, eps

        # Only the creating host's plugin got CreateNetwork (B reads the record).
        assert "created network" in plugins[0].log()
        assert "created network" not in plugins[1].log()
        print(f"\n[{a.name}] {our_routes(a)}\n[{b.name}] {our_routes(b)}\n{ips}")

        host_of = {name: host for name, (host, _) in placement.items()}
        for src, dst in [("wa", "wc"), ("wc", "wa"), ("wa", "we"), ("we", "wa"),
                         ("wc", "we"), ("we", "wc")]:
            assert wait_for(lambda: ping(host_of[src], src, ips[dst]), 10), \
                f"{src} cannot ping {dst} ({ips[dst]})\n" + _dump_state(a, b, plugins, etcd_url)
        # B and D reach nobody and nobody reaches them.
        for src in placement:
            for dst in ("wb", "wd"):
                if src != dst:
                    assert not ping(host_of[src], src, ips[dst], 1), f"{src} reached {dst}"
                    assert not ping(host_of[dst], dst, ips[src], 1), f"{dst} reached {src}"
    finally:
        for name, (host, _) in placement.items():
            host.docker("rm", "-f", name, check=False)
        a.docker("network", "rm", *nets, check=False)
        if calico_ipam:
            ctl(a, cfg, "pool", "remove", POOL)

    # Nothing left on either host nor in the datastore.
    def clean():
        for h in (a, b):
            if our_routes(h) or cali_links(h):
                return False
        leftovers = {k: v for k, v in etcd_items(a, etcd_url).items()
                     if "/endpoint/" in k or k.startswith(("/calico/ipam/v2/assignment/",
                                                           "/calico/ipam/v2/host/",
                                                           "/calico/libnetwork/",
                                                           "/calico/v1/ipam/",
                                                           "/calico/v1/policy/"))}
        return not leftovers
    assert wait_for(clean, 20), _dump_state(a, b, plugins, etcd_url)
    assert "192.168." not in a.run("ip", "-4", "route").stdout
    assert "192.168." not in b.run("ip", "-4", "route").stdout


def _covered(routes_text, ip):
    """The line of ``routes_text`` whose destination contains ``ip`` ('' if none)."""
    import ipaddress
    for line in routes_text.splitlines():
        dst = line.split()[0]
        if ipaddress.ip_address(ip) in ipaddress.ip_network(dst if "/" in dst else dst + "/32"):
            return line + " " + ip
    return ""


def test_demo_calico_ipam(fabric, etcd_url):
    _demo(fabric, etcd_url, calico_ipam=True)


def test_demo_docker_ipam(fabric, etcd_url):
    _demo(fabric, etcd_url, calico_ipam=False,
          subnets=("192.168.10.0/24", "192.168.11.0/24", "192.168.12.0/24"))
