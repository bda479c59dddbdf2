"""netplugin as a managed Docker plugin: ``make managed-plugin`` builds
build/managed-plugin/ (config.json + a debootstrapped rootfs, no registry),
``docker plugin create/set/enable`` installs it in a lab host's dockerd, and
Calico networks work through it; ``disable`` and ``rm`` leave nothing."""
import os
import time

import pytest

from tests.plugin_proc import ROOT, container_ip, etcd_config, etcd_items

pytestmark = pytest.mark.integration

PLUGIN = "netplugin:latest"


@pytest.fixture(scope="module")
def installed(make_host, managed_plugin_dir, etcd_url):
    host = make_host("mp")
    conf = os.path.join(host.dir, "netplugin-etc")
    os.makedirs(conf, exist_ok=True)
    with open(os.path.join(conf, "config.cfg"), "w") as f:
        f.write(etcd_config(etcd_url, "mphost"))
    started = time.monotonic()
    host.docker("plugin", "create", PLUGIN, managed_plugin_dir, timeout=300)
    created = time.monotonic() - started
    host.docker("plugin", "set", PLUGIN, f"config.source={conf}")
    host.docker("plugin", "enable", PLUGIN, timeout=120)
    yield host, created, conf
    host.docker("plugin", "disable", "-f", PLUGIN, check=False)
    host.docker("plugin", "rm", "-f", PLUGIN, check=False)


def test_calico_networks_through_the_managed_plugin(installed, etcd_url):
    host, created, conf = installed
    print(f"docker plugin create took {created:.1f} s")
    out = host.docker("plugin", "inspect", "-f", "{{.Enabled}}", PLUGIN).stdout.strip()
    assert out == "true"
    ctl = [os.path.join(ROOT, "netpluginctl"), "-f", os.path.join(conf, "config.cfg")]
    host.run(*ctl, "pool", "add", "10.66.0.0/24")
    try:
        host.docker("network", "create", "-d", PLUGIN, "--ipam-driver", PLUGIN, "mpnet")
        host.docker("network", "create", "-d", PLUGIN, "--subnet", "192.168.77.0/24", "mpnet2")
        for name, net in (("mpa", "mpnet"), ("mpb", "mpnet"), ("mpc", "mpnet2")):
            host.docker("run", "-d", "--net", net, "--name", name, "busybox", "sleep", "1d")
        ip_a, ip_b = container_ip(host, "mpa", "mpnet"), container_ip(host, "mpb", "mpnet")
        ip_c = container_ip(host, "mpc", "mpnet2")
        assert ip_a.startswith("10.66.0.") and ip_b.startswith("10.66.0.") and ip_a != ip_b
        assert ip_c.startswith("192.168.77.")
        host.docker("exec", "mpa", "ping", "-c1", "-W3", ip_b)
        # The plugin's agent enforces isolation from inside the managed plugin.
        deadline = time.monotonic() + 20
        while True:
            blocked = host.docker("exec", "mpc", "ping", "-c1", "-W1", ip_a,
                                  check=False).returncode != 0
            if blocked or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert blocked, "a container of mpnet2 reached one of mpnet"
        eps = [k for k in etcd_items(host, etcd_url) if "/endpoint/" in k]
        assert len(eps) == 3 and all("/host/mphost/" in k for k in eps)
    finally:
        host.docker("rm", "-f", "mpa", "mpb", "mpc", check=False)
        host.docker("network", "rm", "mpnet", "mpnet2", check=False)
        host.run(*ctl, "pool", "remove", "10.66.0.0/24", check=False)
    left = {k: v for k, v in etcd_items(host, etcd_url).items()
            if "/endpoint/" in k or "/profile/" in k or "/docker/network/" in k}
    assert left == {}
    links = host.run("ip", "-o", "link", "show").stdout
    assert "cali" not in links
    host.docker("plugin", "disable", PLUGIN, timeout=60)
    host.docker("plugin", "rm", PLUGIN, timeout=60)
    assert PLUGIN not in host.docker("plugin", "ls").stdout
