"""Restart survival of the Calico backend, end to end: a real dockerd in one lab
host, the real plugin (./plugin) on the lab's etcd, Docker-IPAM (``--subnet``)
and Calico-IPAM (``--ipam-driver calico``) networks.

* kill -9 of the plugin: containers keep working, new ones come and go, no
  address is handed out twice;
* kill -9 / graceful restarts of dockerd with the plugin up: dockerd cleans
  its containers' endpoints itself (observed), nothing leaks;
* dockerd restarted while the plugin cannot serve it (a stub answering every
  call with an error stands for the plugin: dockerd then gives up at once
  instead of retrying ~15 s per lookup as it does for a missing socket):
  dockerd forgets endpoints; the audit run at the plugin's start-up removes
  their records, devices and Calico IPAM addresses and keeps everything
  Docker still knows (live-restore keeps containers running through it);
* ``./plugin --audit [--dry-run]`` run inside the host on planted leaks.

Nothing here runs in the machine's own network namespace."""
import http.server
import ipaddress
import json
import os
import signal
import socketserver
import threading

import pytest

from tests.plugin_proc import (LAUNCHER, PluginProcess, container_ip, etcd_config, etcd_items,
                               store)
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


POOL = "10.88.0.0/16"               # Calico IPAM pool
DSUBNET = "192.168.60.0/24"         # Docker IPAM network
GRACE = "1"                         # seconds between the audit's two looks
EP_DIR = "/calico/v1/host/{host}/workload/libnetwork/libnetwork/endpoint/"

def endpoint_records(host, url):
    items = etcd_items(host, url, EP_DIR.format(host=host.name))
    return {k.rsplit("/", 1)[1]: json.loads(v) for k, v in items.items()}


def allocated(host, url):
    """Every address allocated in a Calico IPAM block."""
    out = set()
    for value in etcd_items(host, url, "/calico/ipam/v2/assignment/").values():
        block = json.loads(value)
        net = ipaddress.ip_network(block["cidr"])
        out |= {str(net.network_address + o)
                for o, a in enumerate(block["allocations"]) if a is not None}
    return out


def cali_links(host):
    out = host.run("ip", "-o", "link", "show").stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                  if ": cali" in line or ": tmp" in line)


def host_routes(host):
    return host.run("ip", "-4", "route", "show").stdout


def docker_endpoints(host):
    """{EndpointID: IPv4 address} Docker reports on our networks."""
    out = {}
    ids = host.docker("network", "ls", "-q", "--filter", "driver=calico").stdout.split()
    for nid in ids:
        containers = json.loads(host.docker("network", "inspect", "-f",
                                            "{{json .Containers}}", nid).stdout) or {}
        for ep in containers.values():
            out[ep["EndpointID"]] = ep["IPv4Address"].split("/")[0]
    return out


def endpoint_id(host, name, network):
    out = host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout
    return json.loads(out)[network]["EndpointID"]


def ping(host, container, ip):
    return host.docker("exec", container, "ping", "-c1", "-W2", ip,
                       check=False).returncode == 0


def assert_consistent(host, url):
    """What Docker knows and what the datastore/host hold agree: one record,
    one device and one route per endpoint Docker knows, nothing else; the
    Calico allocations are exactly the Calico-IPAM containers' addresses, and
    no address is used twice."""
    known = docker_endpoints(host)
    records = endpoint_records(host, url)
    assert set(records) == set(known), (sorted(records), sorted(known))
    assert cali_links(host) == sorted("cali" + e[:11] for e in known)
    addresses = list(known.values())
    assert len(addresses) == len(set(addresses)), addresses
    calico = {a for a in addresses if ipaddress.ip_address(a) in ipaddress.ip_network(POOL)}
    assert allocated(host, url) == calico
    routes = host_routes(host)
    for addr in addresses:
        assert f"{addr} dev cali" in routes, routes
    for line in routes.splitlines():
        if " dev cali" in line:
            assert line.split()[0] in addresses, routes


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def short_grace():
    """The audit's grace period, for every plugin and --audit run here."""
    old = os.environ.get("NETPLUGIN_AUDIT_GRACE")
    os.environ["NETPLUGIN_AUDIT_GRACE"] = GRACE
    yield
    if old is None:
        os.environ.pop("NETPLUGIN_AUDIT_GRACE", None)
    else:
        os.environ["NETPLUGIN_AUDIT_GRACE"] = old


@pytest.fixture(scope="module")
def host(make_host):
    return make_host("rs")


class Plugin:
    """The plugin of the module, restartable."""

    def __init__(self, host, url):
        self.host, self.url = host, url
        self.config = etcd_config(url, host.name, docker_endpoint=f"unix://{host.sock}",
                                  docker_timeout=10.0)
        self.proc = None

    def audits(self):
        """Summaries logged by the agent's start-up audits so far."""
        out = []
        for line in (self.proc.log() if self.proc else "").splitlines():
            if "start-up audit done" in line:
                out.append(json.loads(line.split("start-up audit done in ", 1)[1]
                                      .split(": ", 1)[1]))
        return out

    def start(self):
        before = len(self.audits()) if self.proc else 0
        self.proc = PluginProcess(self.host, self.config).start()
        assert wait_for(lambda: len(self.audits()) > before, 30), self.proc.log()[-3000:]
        return self.audits()[-1]

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None:
            self.proc.stop(sig)
            if sig == signal.SIGKILL:   # its agent and workers die with it
                wait_for(lambda: not agent_running(self.host), 10)

    def cli_audit(self, *args):
        r = self.host.run(LAUNCHER, "--audit", *args, "-f", self.proc.config_path,
                          env={"NETPLUGIN_AUDIT_GRACE": GRACE}, timeout=120)
        return json.loads(r.stdout)


def agent_running(host):
    """A netplugin process (agent or worker) of this plugin still alive?"""
    cfg = os.path.join(host.dir, "calico.cfg")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"netplugin" in b" ".join(cmd) and cfg.encode() in cmd:
            return True
    return False


@pytest.fixture(scope="module")
def plugin(host, etcd_url):
    store(host, etcd_url, "put", f"/calico/v1/ipam/v4/pool/{POOL.replace('/', '-')}",
          json.dumps({"cidr": POOL}))
    p = Plugin(host, etcd_url)
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def networks(host, plugin, etcd_url):
    host.docker("network", "create", "--driver=calico", f"--subnet={DSUBNET}", "dnet")
    host.docker("network", "create", "--driver=calico", "--ipam-driver=calico", "cnet")
    yield
    names = host.docker("ps", "-aq").stdout.split()
    if names:
        host.docker("rm", "-f", *names, check=False)
    host.docker("network", "rm", "dnet", "cnet", check=False)
    store(host, etcd_url, "rmtree", "/calico")


class StubPlugin:
    """Answers every call on the plugin's socket with HTTP 500, like a plugin
    that cannot reach its datastore: dockerd gets an error at once."""

    class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    def __init__(self, path):
        self.path = path
        self.calls = []
        calls = self.calls

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                calls.append(self.path)
                body = b'{"Err": "plugin unavailable (test stub)"}'
                self.send_response(500)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        if os.path.lexists(path):
            os.unlink(path)
        self.server = self._Server(path, Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        if os.path.lexists(self.path):
            os.unlink(self.path)


# --------------------------------------------------------------------------
# tests


def test_plugin_sigkill_and_restart(host, plugin, networks, etcd_url):
    d = host.docker
    d("run", "-d", "--net", "dnet", "--name", "k1", "busybox", "sleep", "1d")
    d("run", "-d", "--net", "dnet", "--name", "k2", "busybox", "sleep", "1d")
    d("run", "-d", "--net", "cnet", "--name", "k3", "busybox", "sleep", "1d")
    d("run", "-d", "--net", "cnet", "--name", "k4", "busybox", "sleep", "1d")
    ips = {n: container_ip(host, n, net) for n, net in
           (("k1", "dnet"), ("k2", "dnet"), ("k3", "cnet"), ("k4", "cnet"))}
    records = endpoint_records(host, etcd_url)

    plugin.stop(signal.SIGKILL)
    summary = plugin.start()

    # the start-up audit ran and found nothing to remove
    assert summary["docker"] == "ok", summary
    assert (summary["endpoints_removed"], summary["devices_removed"],
            summary["addresses_released"]) == ([], [], [])
    assert summary["kept"] == 4
    assert endpoint_records(host, etcd_url) == records
    # existing containers keep working
    assert ping(host, "k1", ips["k2"]) and ping(host, "k2", ips["k1"])
    assert ping(host, "k3", ips["k4"]) and ping(host, "k4", ips["k3"])
    # new containers come and go; nothing is allocated twice
    d("run", "-d", "--net", "cnet", "--name", "k5", "busybox", "sleep", "1d")
    d("run", "-d", "--net", "dnet", "--name", "k6", "busybox", "sleep", "1d")
    ip5 = container_ip(host, "k5", "cnet")
    assert ip5 not in ips.values()
    assert ping(host, "k5", ips["k3"]) and ping(host, "k3", ip5)
    assert ping(host, "k6", ips["k1"])
    d("run", "--rm", "--net", "cnet", "busybox", "ping", "-c1", "-W2", ips["k4"])
    assert_consistent(host, etcd_url)
    d("rm", "-f", "k5", "k6")
    assert_consistent(host, etcd_url)
    # the on-demand audit agrees
    out = plugin.cli_audit()
    assert out["docker"] == "ok" and out["kept"] == 4
    assert (out["endpoints_removed"], out["devices_removed"], out["addresses_released"]) \
        == ([], [], [])
    d("rm", "-f", "k1", "k2", "k3", "k4")
    assert_consistent(host, etcd_url)


def test_dockerd_restarts_with_plugin_up(host, plugin, networks, etcd_url):
    """Observed: after kill -9 (no live-restore) dockerd kills the old
    containers at start-up and removes their stale sandboxes through the
    plugin (Leave, DeleteEndpoint, ReleaseAddress); on SIGTERM it stops them
    the same way.  --restart=always containers come back with new endpoints."""
    d = host.docker
    d("run", "-d", "--net", "dnet", "--name", "s1", "busybox", "sleep", "1d")
    d("run", "-d", "--net", "cnet", "--name", "s2", "busybox", "sleep", "1d")
    d("run", "-d", "--restart=always", "--net", "cnet", "--name", "r1", "busybox",
      "sleep", "1d")
    d("run", "-d", "--restart=always", "--net", "cnet", "--name", "r2", "busybox",
      "sleep", "1d")
    old = {n: endpoint_id(host, n, net) for n, net in
           (("s1", "dnet"), ("s2", "cnet"), ("r1", "cnet"), ("r2", "cnet"))}

    for kill in (True, False):
        host.restart_dockerd(kill=kill)
        running = wait_for(lambda: set(d("ps", "--format", "{{.Names}}").stdout.split())
                           == {"r1", "r2"}, 30)
        assert running, d("ps", "-a").stdout
        new = {n: endpoint_id(host, n, "cnet") for n in ("r1", "r2")}
        assert not set(new.values()) & set(old.values())
        assert set(docker_endpoints(host)) == set(new.values())
        assert_consistent(host, etcd_url)          # without any audit
        assert ping(host, "r1", container_ip(host, "r2", "cnet"))
        old.update(new)
    out = plugin.cli_audit()
    assert out["docker"] == "ok" and out["kept"] == 2
    assert (out["endpoints_removed"], out["devices_removed"], out["addresses_released"]) \
        == ([], [], [])
    d("rm", "-f", "s1", "s2", "r1", "r2")
    assert_consistent(host, etcd_url)


def test_leaks_of_a_dockerd_restart_are_audited_at_plugin_start(host, plugin, networks,
                                                                etcd_url):
    """live-restore dockerd; two containers die while dockerd is down and the
    plugin cannot serve dockerd's restart: Docker forgets their endpoints.  The
    plugin's start-up audit removes exactly those; live containers (Docker
    still knows them) keep working and keep their records."""
    d = host.docker
    host.restart_dockerd(extra_args=["--live-restore"])
    try:
        for name, net in (("l1", "dnet"), ("l2", "cnet"), ("l3", "cnet"),
                          ("x1", "dnet"), ("x2", "cnet")):
            d("run", "-d", "--net", net, "--name", name, "busybox", "sleep", "1d")
        live = {n: endpoint_id(host, n, net) for n, net in
                (("l1", "dnet"), ("l2", "cnet"), ("l3", "cnet"))}
        dead = {"x1": endpoint_id(host, "x1", "dnet"), "x2": endpoint_id(host, "x2", "cnet")}
        dead_ips = {"x1": container_ip(host, "x1", "dnet"),
                    "x2": container_ip(host, "x2", "cnet")}
        pids = [host.container_pid(n) for n in ("x1", "x2")]

        plugin.stop(signal.SIGKILL)
        host.stop_dockerd(kill=True)
        for pid in pids:                      # the containers die meanwhile
            os.kill(pid, signal.SIGKILL)
        stub = StubPlugin(plugin.proc.socket_path)
        try:
            host.start_dockerd(["--live-restore"])
            assert wait_for(lambda: set(d("ps", "--format", "{{.Names}}").stdout.split())
                            == {"l1", "l2", "l3"}, 30), d("ps", "-a").stdout
        finally:
            stub.close()
        assert stub.calls, "dockerd never asked the (stub) plugin"

        # what Docker still knows: the live endpoints only; ours: everything
        assert set(docker_endpoints(host)) == set(live.values())
        records = endpoint_records(host, etcd_url)
        assert set(records) == set(live.values()) | set(dead.values())
        assert dead_ips["x2"] in allocated(host, etcd_url)
        # plus a stray veth pair of ours, as left by a Join cut short
        host.run("ip", "link", "add", "cali0badc0ffee0", "type", "veth",
                 "peer", "name", "tmp0badc0ffee0")
        host.run("ip", "link", "set", "cali0badc0ffee0", "alias",
                 "netplugin:calico:0badc0ffee0" + "0" * 53)     # Join's marker

        summary = plugin.start()

        assert summary["docker"] == "ok", summary
        assert sorted(summary["endpoints_removed"]) == sorted(dead.values()), summary
        assert summary["addresses_released"] == [dead_ips["x2"]]
        assert "cali0badc0ffee0" in summary["devices_removed"]
        assert summary["kept"] == 3
        assert set(endpoint_records(host, etcd_url)) == set(live.values())
        assert_consistent(host, etcd_url)
        log = plugin.proc.log()
        for eid in dead.values():
            assert f"audit: removed endpoint {eid}" in log
        assert f"audit: released Calico IPAM address {dead_ips['x2']}" in log
        # live containers still work; the dead ones start again, new ones too
        assert ping(host, "l2", container_ip(host, "l3", "cnet"))
        d("start", "x1", "x2")
        d("run", "-d", "--net", "cnet", "--name", "x3", "busybox", "sleep", "1d")
        assert ping(host, "x2", container_ip(host, "l2", "cnet"))
        assert ping(host, "x1", container_ip(host, "l1", "dnet"))
        assert ping(host, "x3", container_ip(host, "x2", "cnet"))
        assert_consistent(host, etcd_url)
    finally:
        d("rm", "-f", "l1", "l2", "l3", "x1", "x2", "x3", check=False)
        host.restart_dockerd(extra_args=[])
    assert_consistent(host, etcd_url)


def test_cli_audit_on_planted_leaks(host, plugin, networks, etcd_url):
    """``./plugin --audit [--dry-run] -f CFG`` inside the host: a leaked
    endpoint record (Calico IPAM address, veth with its route), an orphan
    allocation, while containers run beside them."""
    d = host.docker
    d("run", "-d", "--net", "cnet", "--name", "p1", "busybox", "sleep", "1d")
    d("run", "-d", "--net", "dnet", "--name", "p2", "busybox", "sleep", "1d")
    try:
        cnet = d("network", "inspect", "-f", "{{.Id}}", "cnet").stdout.strip()
        leaked_ip = store(host, etcd_url, "assign", host.name).strip()
        orphan_ip = store(host, etcd_url, "assign", host.name).strip()
        eid = "feed" * 16
        veth = "cali" + eid[:11]
        store(host, etcd_url, "put", EP_DIR.format(host=host.name) + eid, json.dumps(
            {"state": "active", "name": veth, "mac": "ee:ee:ee:ee:ee:ee",
             "profile_ids": ["cnet"], "labels": {}, "ipv4_nets": [leaked_ip + "/32"],
             "ipv6_nets": [], "network_id": cnet}))
        host.run("ip", "link", "add", veth, "type", "veth", "peer", "name", "tmp" + eid[:11])
        host.run("ip", "link", "set", veth, "alias", "netplugin:calico:" + eid)
        host.run("ip", "link", "set", veth, "up")
        host.run("ip", "route", "add", leaked_ip, "dev", veth)

        dry = plugin.cli_audit("--dry-run")
        assert dry["dry_run"] is True and dry["docker"] == "ok"
        assert dry["endpoints_removed"] == [eid]
        assert dry["devices_removed"] == sorted([veth, "tmp" + eid[:11]])
        assert sorted(dry["addresses_released"]) == sorted([leaked_ip, orphan_ip])
        assert eid in endpoint_records(host, etcd_url) and veth in cali_links(host)

        out = plugin.cli_audit()
        assert out["endpoints_removed"] == [eid]
        assert out["devices_removed"] == sorted([veth, "tmp" + eid[:11]])
        assert sorted(out["addresses_released"]) == sorted([leaked_ip, orphan_ip])
        assert out["kept"] == 2
        assert f"{leaked_ip} dev" not in host_routes(host)
        assert_consistent(host, etcd_url)
        assert ping(host, "p1", container_ip(host, "p1", "cnet"))

        # Docker unreachable: nothing is touched
        store(host, etcd_url, "put", EP_DIR.format(host=host.name) + eid, json.dumps(
            {"state": "active", "name": veth, "mac": "ee:ee:ee:ee:ee:ee",
             "profile_ids": ["cnet"], "ipv4_nets": [], "ipv6_nets": [],
             "network_id": cnet}))
        host.stop_dockerd()
        try:
            out = plugin.cli_audit()
            assert out["docker"].startswith("unreachable"), out
            assert out["endpoints_removed"] == []
            assert eid in endpoint_records(host, etcd_url)
        finally:
            host.start_dockerd()
        store(host, etcd_url, "delete", EP_DIR.format(host=host.name) + eid)
    finally:
        d("rm", "-f", "p1", "p2", check=False)
    assert_consistent(host, etcd_url)
