"""Locking the plugin down, end to end: one lab host with a real dockerd, the
real plugin (./plugin) on the lab's etcd.

* the socket is 0660 root:docker; uid 65534 (setpriv, no groups) cannot
  connect, the same uid in the docker group can;
* 20 MiB bodies (with a length, and chunked; several at once) are refused
  with HTTP 413 and a JSON Err, logged as a refusal (no traceback), and no
  plugin process grows past 200 MB;
* CreateEndpoint with an address outside the network's subnet (Docker IPAM)
  or not allocated to it (Calico IPAM, a neighbour's address) is refused:
  nothing stored, no route installed, Join of it refused too;
* ReleaseAddress with another pool's PoolID is refused and the container's
  allocation kept;
* a Docker-IPAM network overlapping a Calico pool is refused naming the
  pool, and the pool key is byte-identical afterwards.

Nothing here runs in the machine's own network namespace."""
import grp
import ipaddress
import json
import os
import socket
import stat
import threading

import pytest

from tests.plugin_proc import (LAUNCHER, PluginProcess, container_ip, etcd_config, etcd_items,
                               store)

pytestmark = pytest.mark.integration

CTL = LAUNCHER.replace("/plugin", "/netpluginctl")
POOL = "192.168.0.0/16"
POOL_KEY = "/calico/v1/ipam/v4/pool/192.168.0.0-16"
IN_HOST_SOCKET = "/run/docker/plugins/calico.sock"
EP_DIR = "/calico/v1/host/{host}/workload/libnetwork/libnetwork/endpoint/"
MIB = 1024 * 1024
NOBODY = "65534"


@pytest.fixture(scope="module", params=[1, 2], ids=["waitress", "gunicorn"])
def env(request, make_host, etcd_url):
    """The plugin in one process (waitress), and with two gunicorn workers
    (which get the pre-bound socket as fd://N)."""
    workers = request.param
    host = make_host(f"sec{workers}")
    cfg = etcd_config(etcd_url, host.name, "local").replace(
        'log_level = "info"\n', f'log_level = "info"\nworkers = {workers}\n')
    plugin = PluginProcess(host, cfg)
    plugin.start()
    host.run(CTL, "-f", plugin.config_path, "pool", "add", POOL, timeout=60)
    yield host, plugin
    for name in ("c1",):
        host.docker("rm", "-f", name, check=False)
    for net in ("dnet", "cnet", "overlap"):
        host.docker("network", "rm", net, check=False)
    host.run(CTL, "-f", plugin.config_path, "pool", "remove", POOL, check=False, timeout=60)
    plugin.stop()
    store(host, etcd_url, "rmtree", "/calico")      # the etcd is the session's


def docker_gid():
    try:
        return grp.getgrnam("docker").gr_gid
    except KeyError:
        return 0


def curl_as(host, *setpriv_args):
    """curl /Plugin.Activate on the plugin socket as uid 65534."""
    return host.run("setpriv", "--reuid", NOBODY, "--regid", NOBODY, *setpriv_args,
                    "curl", "-sS", "-m", "5", "-X", "POST", "--unix-socket", IN_HOST_SOCKET,
                    "http://plugin/Plugin.Activate", check=False)


def plugin_pids(plugin):
    """The plugin's processes: its session (the launcher execs into Python)."""
    sid = os.getsid(plugin.proc.pid)
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    pids.append(int(name))
            except OSError:
                continue
    return pids


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def records(host, url):
    return etcd_items(host, url, EP_DIR.format(host=host.name))


def cali_routes(host):
    return [line for line in host.ip("route").stdout.splitlines() if "cali" in line]


# --------------------------------------------------------------------------
# access


def test_socket_is_0660_root_docker_and_nobody_cannot_connect(env):
    host, plugin = env
    st = os.stat(plugin.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, docker_gid())
    # the directory is traversable by nobody: the socket's mode is what refuses
    assert host.run("setpriv", "--reuid", NOBODY, "--regid", NOBODY, "--clear-groups",
                    "ls", "-ld", IN_HOST_SOCKET, check=False).returncode == 0
    denied = curl_as(host, "--clear-groups")
    assert denied.returncode != 0 and "Implements" not in denied.stdout
    assert "ermission denied" in denied.stderr or denied.returncode == 7
    if docker_gid():
        allowed = curl_as(host, "--groups", str(docker_gid()))
        assert allowed.returncode == 0 and "NetworkDriver" in allowed.stdout, allowed.stderr


def test_no_tcp_listener(env):
    host, plugin = env
    out = host.run("ss", "-H", "-ltnp", check=False).stdout
    pids = set(map(str, plugin_pids(plugin)))
    assert not [line for line in out.splitlines()
                if any(f"pid={pid}," in line for pid in pids)], out


# --------------------------------------------------------------------------
# limits


def _post_chunked(path, size):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    s.sendall(b"POST /NetworkDriver.CreateNetwork HTTP/1.1\r\nHost: plugin\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"a" * MIB
    head = b'{"NetworkID": "' + b"f" * 64 + b'", "x": "'
    try:
        s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        for _ in range(size // MIB):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        s.sendall(b'2\r\n"}\r\n0\r\n\r\n')
    except (BrokenPipeError, ConnectionResetError):
        pass                         # refused before the end: fine
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < 64:
            more = s.recv(65536)
            if not more:
                break
            data += more
    finally:
        s.close()
    return data


def test_20_mib_bodies_are_refused_and_memory_stays_small(env, etcd_url):
    host, plugin = env
    before_keys = etcd_items(host, etcd_url, "/calico")
    big = json.dumps({"NetworkID": "f" * 64, "Options": {"x": "a" * (20 * MIB)}}).encode()
    answers = []
    peak = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for pid in plugin_pids(plugin):
                peak[pid] = max(peak.get(pid, 0.0), rss_mb(pid))
            done.wait(0.05)

    def send():
        answers.append(plugin.call("/NetworkDriver.CreateNetwork", raw=big))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        senders = [threading.Thread(target=send) for _ in range(4)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(120)
        chunked = _post_chunked(plugin.socket_path, 20 * MIB)
    finally:
        done.set()
        sampler.join(10)
    assert len(answers) == 4
    for status, body in answers:
        assert status == 413 and "limit" in body["Err"], body
    assert chunked.startswith(b"HTTP/1.1 413"), chunked[:200]
    assert peak and max(peak.values()) < 200, peak
    log = plugin.log()
    assert "refused" in log and "Traceback" not in log
    assert etcd_items(host, etcd_url, "/calico") == before_keys
    assert plugin.call("/Plugin.Activate")[0] == 200              # still serving


# --------------------------------------------------------------------------
# addresses


def test_create_endpoint_outside_the_subnet_or_foreign_is_refused(env, etcd_url):
    host, plugin = env
    host.docker("network", "create", "--driver", "calico", "--subnet", "10.77.0.0/24", "dnet")
    host.docker("network", "create", "--driver", "calico", "--ipam-driver", "calico",
                "--subnet", "192.168.10.0/24", "cnet")
    nets = {n: host.docker("network", "inspect", "-f", "{{.Id}}", n).stdout.strip()
            for n in ("dnet", "cnet")}
    before = records(host, etcd_url)
    routes_before = cali_routes(host)
    cases = [("dnet", "10.78.0.5/24"),          # outside the Docker-IPAM subnet
             ("dnet", "10.99.0.2/32"),          # the lab neighbour's address
             ("cnet", "192.168.10.77/32"),      # in the subnet, not allocated
             ("cnet", "10.99.0.2/32")]          # a neighbour's address
    for i, (net, address) in enumerate(cases):
        eid = f"{i:x}" * 64
        eid = eid[:64]
        status, body = plugin.call("/NetworkDriver.CreateEndpoint", {
            "NetworkID": nets[net], "EndpointID": eid, "Interface": {"Address": address}})
        assert status == 500 and body["Err"], (net, address, body)
        status, body = plugin.call("/NetworkDriver.Join", {
            "NetworkID": nets[net], "EndpointID": eid,
            "SandboxKey": "/var/run/docker/netns/none", "Options": {}})
        assert status == 500 and body["Err"]
    assert records(host, etcd_url) == before
    assert cali_routes(host) == routes_before
    assert "10.99.0.2 " not in host.ip("route").stdout.replace("10.99.0.2/", "")
    assert "Traceback" not in plugin.log()


def test_release_address_with_a_wrong_pool_id_keeps_the_allocation(env, etcd_url):
    host, plugin = env
    host.docker("run", "-d", "--net", "cnet", "--name", "c1", "busybox", "sleep", "1d")
    ip = container_ip(host, "c1", "cnet")
    blocks_before = etcd_items(host, etcd_url, "/calico/ipam/v2/")
    for wrong in ("CalicoPoolIPv4", "192.168.20.0/24"):
        status, body = plugin.call("/IpamDriver.ReleaseAddress", {"PoolID": wrong,
                                                                 "Address": ip})
        assert status == 500 and "not handed out by pool" in body["Err"], body
    status, body = plugin.call("/IpamDriver.ReleaseAddress", {"PoolID": "192.168.10.0/24",
                                                             "Address": "192.168.10.250"})
    assert status == 500 and "not allocated" in body["Err"]
    assert etcd_items(host, etcd_url, "/calico/ipam/v2/") == blocks_before
    # the allocation carries the handle of its pool
    block = next(json.loads(v) for k, v in blocks_before.items()
                 if "/assignment/" in k
                 and ipaddress.ip_address(ip) in ipaddress.ip_network(json.loads(v)["cidr"]))
    net = ipaddress.ip_network(block["cidr"])
    attr = block["attributes"][block["allocations"][int(ipaddress.ip_address(ip)) -
                                                   int(net.network_address)]]
    assert attr["handle_id"].startswith("netplugin.192.168.10.0-24.")
    host.docker("rm", "-f", "c1")                  # Docker's own release still works
    after = etcd_items(host, etcd_url, "/calico/ipam/v2/")
    assert not [k for k in after if k.endswith(attr["handle_id"])]


def test_overlapping_docker_ipam_network_is_refused_pool_unchanged(env, etcd_url):
    host, plugin = env
    pool_before = store(host, etcd_url, "get", POOL_KEY)
    for subnet in ("192.168.5.0/24", POOL):
        out = host.docker("network", "create", "--driver", "calico", "--subnet", subnet,
                          "overlap", check=False)
        assert out.returncode != 0 and POOL in (out.stderr + out.stdout), out.stderr
    assert store(host, etcd_url, "get", POOL_KEY) == pool_before
    assert POOL in host.run(CTL, "-f", plugin.config_path, "pool", "show").stdout
