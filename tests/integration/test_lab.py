"""Smoke tests of the test lab itself (tests/lab/)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.integration.conftest import root_links
from tests.lab import (CGROUP_NAME, STATE_ROOT, Lab, _cgroup_mounts, _mountinfo,
                       _ns_inode, _pid_alive, sweep_dead_labs)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _lab_leftovers(labid, labdir, pids=()):
    """Everything of lab `labid` that still exists (empty dict = clean)."""
    left = {}
    netns = [n for n in os.listdir("/run/netns") if n.startswith(labid + "-")] \
        if os.path.isdir("/run/netns") else []
    if netns:
        left["netns"] = netns
    mounts = [mp for mp, _ in _mountinfo() if mp == labdir or mp.startswith(labdir + "/")]
    if mounts:
        left["mounts"] = mounts
    alive = [p for p in pids if _pid_alive(p)]
    if alive:
        left["pids"] = alive
    cgs = [os.path.join(r, CGROUP_NAME, labid) for r in _cgroup_mounts()
           if os.path.exists(os.path.join(r, CGROUP_NAME, labid))]
    if cgs:
        left["cgroups"] = cgs
    for d in (labdir, os.path.join(STATE_ROOT, labid)):
        if os.path.exists(d):
            left.setdefault("dirs", []).append(d)
    return left


def _lab_pids(lab):
    """PIDs of every process running in the lab's namespaces or recorded by it."""
    pids = set()
    with open(os.path.join(lab.statedir, "pids")) as f:
        pids.update(int(line.split()[0]) for line in f if line.strip())
    want = set()
    for h in lab.hosts.values():
        want.add("net:[%d]" % _ns_inode(h.netns_path))
        want.add("mnt:[%d]" % _ns_inode(h.mntns_path))
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.readlink("/proc/%s/ns/net" % d) in want or \
                        os.readlink("/proc/%s/ns/mnt" % d) in want:
                    pids.add(int(d))
            except OSError:
                pass
    return {p for p in pids if _pid_alive(p)}


def test_host_network_and_ping(lab, host_a, make_host):
    b = make_host("b2", dockerd=False)
    for h in (host_a, b):
        addrs = h.ip("-o", "-4", "addr", "show", "dev", "eth0").stdout
        assert h.addr + "/24" in addrs
        routes = h.ip("route", "show", "default").stdout.strip()
        assert routes.startswith("default dev eth0") and "via" not in routes, routes
        assert "state UP" in h.ip("link", "show", "lo").stdout or \
            "LOOPBACK,UP" in h.ip("link", "show", "lo").stdout
        assert h.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
        # the host's /sys is its own netns' sysfs
        assert sorted(h.run("ls", "/sys/class/net").stdout.split()) == ["eth0", "lo"]
    host_a.run("busybox", "ping", "-c", "1", "-W", "3", b.addr, timeout=20)
    b.run("busybox", "ping", "-c", "1", "-W", "3", host_a.addr, timeout=20)
    # an unknown address gets no answer (default route has no gateway)
    r = host_a.run("busybox", "ping", "-c", "1", "-W", "1", "10.99.0.250", check=False)
    assert r.returncode != 0
    r = host_a.run("busybox", "ping", "-c", "1", "-W", "1", "8.8.8.8", check=False)
    assert r.returncode != 0
    # python code can run inside a host's netns without leaving the test process
    import socket

    def probe():
        s = socket.socket()
        s.settimeout(3)
        try:
            return s.connect_ex((host_a.addr, 9))   # nothing listens: refused
        finally:
            s.close()
    import errno
    assert b.call(probe) == errno.ECONNREFUSED


def test_etcd_reachable_from_host(lab, etcd_url, host_a):
    assert etcd_url == "http://10.99.0.2:2379"
    out = host_a.run("busybox", "wget", "-qO-", etcd_url + "/version", timeout=20).stdout
    assert "etcdserver" in json.loads(out)
    # v2 API is enabled: write then read a key from the host
    host_a.run(sys.executable, "-c", textwrap.dedent("""
        import urllib.request, urllib.parse, sys
        url = sys.argv[1] + "/v2/keys/lab-smoke"
        req = urllib.request.Request(url, data=urllib.parse.urlencode({"value": "hi"}).encode(), method="PUT")
        urllib.request.urlopen(req, timeout=5).read()
        assert b'"hi"' in urllib.request.urlopen(url, timeout=5).read()
    """), etcd_url, timeout=30)
    # and through Host.call with requests, from the test process itself
    import requests
    r = host_a.call(requests.get, etcd_url + "/v2/keys/lab-smoke", timeout=5)
    assert r.json()["node"]["value"] == "hi"


def test_docker_run_in_host(lab, host_a):
    host_a.docker("run", "--rm", "--net", "none", "busybox", "true")
    r = host_a.docker("run", "--rm", "--net", "none", "bb", "ip", "-o", "link")
    assert [l.split(":")[1].strip() for l in r.stdout.splitlines()] == ["lo"]
    # container cgroups are removed after --rm
    for root in _cgroup_mounts():
        d = os.path.join(root, host_a.cgroup_parent.lstrip("/"))
        if os.path.isdir(d):
            assert [e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e))] == []
    # a long-running container: its netns file exists only in the host's mount ns
    cid = host_a.docker("run", "-d", "--net", "none", "--name", "sleeper", "busybox",
                        "sleep", "600").stdout.strip()
    try:
        key = host_a.docker("inspect", "-f", "{{.NetworkSettings.SandboxKey}}", cid).stdout.strip()
        assert key.startswith(host_a.exec_root + "/netns/")
        assert host_a.run("findmnt", key).returncode == 0
        assert all(mp != key for mp, _ in _mountinfo())
        assert host_a.exec_in_container("sleeper", "hostname").stdout.strip() == cid[:12]
    finally:
        host_a.docker("rm", "-f", cid)
    # the SDK client works too
    c = host_a.client()
    assert c.ping()
    assert "bb:latest" in [t for i in c.images.list() for t in i.tags]


def test_plugins_dir_and_spawn(lab, host_a):
    marker = os.path.join(host_a.plugins_dir, "lab-smoke.spec")
    with open(marker, "w") as f:
        f.write("unix:///run/docker/plugins/lab-smoke.sock\n")
    try:
        assert "lab-smoke.spec" in host_a.run("ls", "/run/docker/plugins").stdout.split()
    finally:
        os.unlink(marker)
    p = host_a.spawn(["sh", "-c", "readlink /proc/self/ns/net; exec sleep 600"])
    try:
        deadline = time.time() + 10
        while time.time() < deadline and not open(p.log_path).read().strip():
            time.sleep(0.05)
        assert open(p.log_path).read().strip() == "net:[%d]" % _ns_inode(host_a.netns_path)
        assert os.readlink("/proc/%d/ns/mnt" % p.pid) == "mnt:[%d]" % _ns_inode(host_a.mntns_path)
    finally:
        host_a.stop_process(p)
    assert p.poll() is not None


def test_dockerd_restart(lab, host_a):
    host_a.restart_dockerd()
    host_a.docker("run", "--rm", "--net", "none", "busybox", "true")
    host_a.restart_dockerd(kill=True)          # crash + restart: containerd is adopted/replaced
    host_a.docker("run", "--rm", "--net", "none", "busybox", "true")


def test_close_leaves_nothing(docker_version):
    before = root_links()
    lab = Lab.create()
    try:
        assert lab.labid != ""
        h = lab.add_host("x", docker_version=docker_version)
        lab.start_etcd()
        h.start_dockerd()
        h.docker("run", "-d", "--net", "none", "--name", "ctr", "busybox", "sleep", "600")
        h.spawn(["sleep", "600"])
        assert root_links() == before
        pids = _lab_pids(lab) | {h.container_pid("ctr")}
        # dockerd, containerd, shim, container, spawned sleep, etcd
        assert len(pids) >= 6, pids
        assert _lab_leftovers(lab.labid, lab.dir, pids)
    finally:
        lab.close()
    lab.close()                                 # idempotent
    assert lab.cleanup_problems == []
    assert _lab_leftovers(lab.labid, lab.dir, pids) == {}
    assert root_links() == before


_KILLED_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, %(root)r)
    from tests.lab import Lab
    lab = Lab.create()
    h = lab.add_host("k", docker_version=%(version)r)
    lab.start_etcd()
    h.start_dockerd()
    h.docker("run", "-d", "--net", "none", "busybox", "sleep", "600")
    h.spawn(["sleep", "600"])
    print(lab.labid, lab.dir, lab.statedir, flush=True)
    time.sleep(600)
""")


def test_sigkilled_run_is_swept(lab, host_a):
    p = subprocess.Popen([sys.executable, "-c", _KILLED_RUN % {"root": ROOT,
                                                              "version": host_a.docker_version}],
                         stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline().split()
        assert len(line) == 3, "child lab did not start"
        labid, labdir, statedir = line
        net_ino = _ns_inode("/run/netns/%s-k" % labid)
        mnt_ino = _ns_inode(os.path.join(labdir, "k", "mntns"))
        assert net_ino and mnt_ino
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    want = {"net:[%d]" % net_ino, "mnt:[%d]" % mnt_ino}
    pids = set()
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink("/proc/%s/ns/net" % d) in want or os.readlink("/proc/%s/ns/mnt" % d) in want:
                pids.add(int(d))
        except OSError:
            pass
    left = _lab_leftovers(labid, labdir, pids)
    assert "netns" in left and "pids" in left and "dirs" in left, left

    swept = sweep_dead_labs()       # (a concurrent run may have swept it already)
    assert _lab_leftovers(labid, labdir, pids) == {}
    # our own (live) lab was not touched by the sweep
    assert lab.labid not in swept
    host_a.docker("run", "--rm", "--net", "none", "busybox", "true")


def test_root_netns_untouched(lab):
    # runs late in the module: the lab has hosts, etcd, containers by now
    assert root_links() == lab.root_links_before
