"""netpluginctl (backends.calico.ctl): every subcommand against a real etcd and
the embedded datastore, through ``main([...])`` and through the installed
console script / ./netpluginctl launcher.

In-process tests never read the machine's network namespace: ``run_command``
is replaced by canned ``ip``/``nft`` answers.  ``status`` and ``diags`` with
the real ``ip``/``nft`` run in a subprocess inside ``unshare --net`` (a
throwaway network namespace).
"""
from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import socketserver
import subprocess
import sys
import stat
import tarfile
import tempfile
import threading

import pytest

from backends.calico import ctl
from backends.calico.ctl import base as ctl_base
from backends.calico.ctl import cli as ctl_cli
from backends.calico import ipam as ci
from backends.calico import model as keys
from netplugin.datastore.embedded import EmbeddedDatastore
from netplugin.datastore.etcd import EtcdDatastore
from netplugin.datastore.etcdv3 import Etcd3Datastore
from netplugin.config import load_config
from tests.datastore_servers import free_port, run_etcd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "netpluginctl")
LAUNCHER = os.path.join(ROOT, "netpluginctl")
HOST, OTHER = "host-a", "host-b"
EID1 = "1" * 64
EID2 = "2" * 64
EID3 = "3" * 64
NEEDS_NETNS = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip for a throwaway network namespace")


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def etcd_url():
    with run_etcd() as server:
        yield server.url


def write_config(tmp_path, kind: str, etcd_url: str = "", hostname: str = HOST,
                 extra: str = "") -> str:
    if kind in ("etcd", "etcdv3"):
        ds = f'type = "{kind}"\nendpoints = ["{etcd_url}"]\ntimeout = 3\n'
    else:
        ds = f'type = "embedded"\npath = "{tmp_path}/state.db"\n'
    text = (f'backend = "calico"\nsocket = "{tmp_path}/plugins/calico.sock"\n'
            f'state_dir = "{tmp_path}/state"\n{extra}'
            f'[datastore]\n{ds}'
            f'[calico]\nhostname = "{hostname}"\n'
            f'docker_endpoint = "unix://{tmp_path}/docker.sock"\n')
    path = tmp_path / f"{kind}.cfg"
    path.write_text(text)
    return str(path)


class Env:
    """A config file, a direct datastore handle and ``run()`` = ``main()``."""

    def __init__(self, kind, tmp_path, capsys, etcd_url=""):
        self.kind = kind
        self.tmp = tmp_path
        self.capsys = capsys
        self.cfg_path = write_config(tmp_path, kind, etcd_url)
        self.cfg = load_config(self.cfg_path)
        if kind == "etcd":
            self.store = EtcdDatastore([etcd_url])
            self.store.delete_prefix("/calico")
        elif kind == "etcdv3":   # the same etcd, its v3 keyspace
            self.store = Etcd3Datastore([etcd_url])
            self.store.delete_prefix("/calico")
        else:
            self.store = EmbeddedDatastore(str(tmp_path / "state.db"))
        self.ipam = ci.CalicoIpam(self.store)

    def run(self, *args, stdin: str = None):
        """(exit status, stdout, stderr) of ``netpluginctl -f CFG args...``."""
        self.capsys.readouterr()
        if stdin is not None:
            old, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            rc = ctl.main(["-f", self.cfg_path, *args])
        finally:
            if stdin is not None:
                sys.stdin = old
        out, err = self.capsys.readouterr()
        return rc, out, err

    def ok(self, *args, **kw) -> str:
        rc, out, err = self.run(*args, **kw)
        assert rc == 0, (args, out, err)
        return out

    def json(self, *args, **kw):
        return json.loads(self.ok("--json", *args, **kw))

    def fail(self, *args, rc: int = 1) -> str:
        code, out, err = self.run(*args)
        assert code == rc, (args, code, out, err)
        if rc == 1:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("netpluginctl: error: "), err
            assert "Traceback" not in err
        return err

    def get(self, key):
        return json.loads(self.store.get(key).value)

    def put_endpoint(self, eid, nets, profiles, host=HOST, mac="ee:ee:ee:ee:ee:ee"):
        v4 = [n for n in nets if ":" not in n]
        v6 = [n for n in nets if ":" in n]
        self.store.put(keys.endpoint(host, eid), json.dumps({
            "state": "active", "name": "cali" + eid[:11], "mac": mac,
            "profile_ids": list(profiles), "labels": {}, "ipv4_nets": v4, "ipv6_nets": v6}))

    def close(self):
        if self.kind in ("etcd", "etcdv3"):
            self.store.delete_prefix("/calico")
        self.store.close()


@pytest.fixture(params=["etcd", "etcdv3", "embedded"])
def env(request, tmp_path, capsys):
    url = request.getfixturevalue("etcd_url") if request.param != "embedded" else ""
    e = Env(request.param, tmp_path, capsys, url)
    yield e
    e.close()


@pytest.fixture
def etcd_env(tmp_path, capsys, etcd_url):
    e = Env("etcd", tmp_path, capsys, etcd_url)
    yield e
    e.close()


FAKE_IP = {}


@pytest.fixture(autouse=True)
def _no_host_netns(monkeypatch):
    """In-process runs: canned ip/nft output, never the machine's own netns."""
    FAKE_IP.clear()

    def fake(argv, timeout=None):
        if argv[0] == "ip":
            return 0, json.dumps(FAKE_IP.get(tuple(argv[2:]), [])), ""
        if argv[0] == "nft":
            return 0, '{"nftables": []}' if "-j" in argv else "", ""
        return 127, "", f"{argv[0]}: not faked"

    monkeypatch.setattr(ctl_base, "run_command", fake)
    monkeypatch.setattr(ctl_base, "POOL_REMOVE_GRACE", 0)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve_unix(path: str, routes):
    """An HTTP server on a unix socket; ``routes(method, path)`` -> (status, obj)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            status, obj = routes(self.command, self.path)
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

        def address_string(self):
            return "unix"

    os.makedirs(os.path.dirname(path), exist_ok=True)
    server = _UnixHTTPServer(path, Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    return server


@pytest.fixture
def fake_plugin(tmp_path):
    """Something answering /Plugin.Activate on the config's socket path."""
    path = str(tmp_path / "plugins" / "calico.sock")
    health = {"healthy": True, "checks": {"datastore": {"ok": True, "detail": "answers"}}}
    server = serve_unix(path, lambda m, p: (200, {"Implements": ["NetworkDriver",
                                                                  "IpamDriver"]})
                        if p == "/Plugin.Activate" else (200, health) if p == "/health"
                        else (404, {"Err": "no"}))
    yield path
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------
# the table formatter and the rule syntax (pure)


def test_format_table_aligns_and_wraps():
    text = ctl.format_table(["Name", "Addresses"], [["a", "10.0.0.1/32\nfd00::1/128"],
                                                   ["longer-name", ""]])
    lines = text.splitlines()
    assert lines[0] == lines[2] == lines[-1] == "+-------------+-------------+"
    assert lines[1] == "|     Name    |  Addresses  |"
    assert lines[3] == "| a           | 10.0.0.1/32 |"
    assert lines[4] == "|             | fd00::1/128 |"
    assert lines[5] == "| longer-name |             |"
    assert len({len(line) for line in lines}) == 1


@pytest.mark.parametrize("spec, rule", [
    ("allow", {"action": "allow"}),
    ("deny tcp from ports 1000-2000,22 tag DB cidr 10.1.0.0/16 to ports 80",
     {"action": "deny", "protocol": "tcp", "src_ports": ["1000:2000", 22], "src_tag": "DB",
      "src_net": "10.1.0.0/16", "dst_ports": [80]}),
    ("allow icmp type 8 code 0 from 192.168.0.0/16",
     {"action": "allow", "protocol": "icmp", "icmp_type": 8, "icmp_code": 0,
      "src_net": "192.168.0.0/16"}),
    ("allow to tag WEB", {"action": "allow", "dst_tag": "WEB"}),
    ("allow udp to cidr fd00::/64 ports 53",
     {"action": "allow", "protocol": "udp", "dst_net": "fd00::/64", "dst_ports": [53]}),
])
def test_parse_rule_and_print(spec, rule):
    assert ctl.parse_rule(spec.split()) == rule
    # the printed form parses back to the same rule
    assert ctl.parse_rule(ctl.rule_text(rule).split()) == rule


@pytest.mark.parametrize("spec, message", [
    ("", "expected 'allow' or 'deny'"),
    ("permit", "expected 'allow' or 'deny'"),
    ("allow icmp from ports 80", "ports are not valid with protocol icmp"),
    ("allow tcp to ports 70000", "out of range"),
    ("allow tcp to ports 90:80", "minimum 90 > maximum 80"),
    ("allow tcp to ports http", "ports 'http' are invalid"),
    ("allow udp type 3", "'type' needs protocol icmp"),
    ("allow icmp type 300", "ICMP type must be an integer 0-255"),
    ("allow from tag bad/tag", "invalid tag name"),
    ("allow from nonsense", "unexpected 'nonsense' after 'from'"),
    ("allow from", "'from' needs ports, tag or cidr"),
    ("allow icmp to cidr fd00::/64", "use icmpv6"),
    ("allow from 10.0.0.0/8 to fd00::/8", "different IP versions"),
    ("allow tcp sideways", "unexpected 'sideways'"),
])
def test_parse_rule_errors(spec, message):
    with pytest.raises(ctl.CtlError, match=message):
        ctl.parse_rule(spec.split())


def test_global_options_anywhere():
    assert ctl_cli._hoist_globals(["pool", "show", "--json", "-f", "x.cfg"]) == \
        ["--json", "-f", "x.cfg", "pool", "show"]
    assert ctl_cli._hoist_globals(["--config=y", "status"]) == ["--config=y", "status"]


# --------------------------------------------------------------------------
# pools


def test_pool_add_show_update(env):
    assert env.ok("pool", "add", "10.10.0.0/16", "--ipip", "--nat-outgoing") == \
        "Added pool 10.10.0.0/16\n"
    assert env.get("/calico/v1/ipam/v4/pool/10.10.0.0-16") == \
        {"cidr": "10.10.0.0/16", "ipip": "tunl0", "masquerade": True}
    assert env.store.get("/calico/v1/config/IpInIpEnabled").value == "true"
    env.ok("pool", "add", "fd80:24e2:f998:72d6::/64", "192.168.0.0/24")
    assert env.get("/calico/v1/ipam/v6/pool/fd80:24e2:f998:72d6::-64") == \
        {"cidr": "fd80:24e2:f998:72d6::/64"}

    out = env.ok("pool", "show")
    assert "|   IPv4 CIDR    |      Options      |" in out
    assert "| 10.10.0.0/16   | ipip,nat-outgoing |" in out
    assert "| 192.168.0.0/24 |                   |" in out
    assert "| fd80:24e2:f998:72d6::/64 |" in out
    assert "IPv6" not in env.ok("pool", "show", "--ipv4")
    assert "IPv4" not in env.ok("pool", "show", "--ipv6")

    # the identical CIDR updates the flags (and re-enables a disabled pool)
    env.store.put("/calico/v1/ipam/v4/pool/10.10.0.0-16",
                  json.dumps({"cidr": "10.10.0.0/16", "ipip": "tunl0", "disabled": True}))
    assert env.ok("pool", "add", "10.10.0.0/16", "--nat-outgoing") == \
        "Updated pool 10.10.0.0/16\n"
    assert env.get("/calico/v1/ipam/v4/pool/10.10.0.0-16") == \
        {"cidr": "10.10.0.0/16", "masquerade": True}

    data = env.json("pool", "show")
    assert [(p["cidr"], p["ipip"], p["nat_outgoing"], p["state"]) for p in data] == [
        ("10.10.0.0/16", False, True, "enabled"),
        ("192.168.0.0/24", False, False, "enabled"),
        ("fd80:24e2:f998:72d6::/64", False, False, "enabled")]
    assert env.json("pool", "add", "10.99.0.0/24")[0]["action"] == "added"


def test_pool_add_errors(env):
    env.ok("pool", "add", "10.10.0.0/16")
    assert "overlaps the existing pool 10.10.0.0/16" in env.fail("pool", "add", "10.10.4.0/24")
    assert "overlaps the existing pool" in env.fail("pool", "add", "10.0.0.0/8")
    assert "not a valid CIDR" in env.fail("pool", "add", "10.300.0.0/16")
    assert "did you mean 10.20.0.0/16" in env.fail("pool", "add", "10.20.0.1/16")
    assert "IPIP is not supported on IPv6" in env.fail("pool", "add", "fd00::/64", "--ipip")
    assert "/26 or shorter" in env.fail("pool", "add", "10.30.0.0/27")
    assert "/122 or shorter" in env.fail("pool", "add", "fd00::/124")
    assert "given together overlap" in env.fail("pool", "add", "10.40.0.0/16",
                                                 "10.40.1.0/24")
    # nothing of a refused command was written
    assert [p.cidr for p in env.ipam.pools(4)] == [ci.ipaddress.ip_network("10.10.0.0/16")]
    assert env.ipam.pools(6) == []
    env.fail("pool", "add", rc=2)                            # usage: no CIDR
    env.fail("pool", "show", "--ipv4", "--ipv6", rc=2)


def test_pool_add_updates_docker_ipam_pool_without_block_check(env):
    """An ``ipam: false`` pool (a Docker-IPAM network's subnet) keeps that flag."""
    env.store.put("/calico/v1/ipam/v4/pool/172.30.0.0-28",
                  json.dumps({"cidr": "172.30.0.0/28", "ipam": False}))
    env.ok("pool", "add", "172.30.0.0/28", "--nat-outgoing")
    assert env.get("/calico/v1/ipam/v4/pool/172.30.0.0-28") == \
        {"cidr": "172.30.0.0/28", "ipam": False, "masquerade": True}
    assert "no-ipam" in env.ok("pool", "show")


def test_pool_remove_releases_affinities(env):
    env.ok("pool", "add", "10.20.0.0/24", "10.50.0.0/24")
    ip_a = env.ipam.auto_assign_one(4, HOST, within=ci.ipaddress.ip_network("10.20.0.0/24"))
    ip_b = env.ipam.auto_assign_one(4, OTHER, within=ci.ipaddress.ip_network("10.20.0.0/24"))
    ip_c = env.ipam.auto_assign_one(4, "host-c", within=ci.ipaddress.ip_network("10.20.0.0/24"))
    env.ipam.release_ips([ip_c])         # host-c keeps an empty affine block
    ip_keep = env.ipam.auto_assign_one(4, HOST,
                                       within=ci.ipaddress.ip_network("10.50.0.0/24"))
    block_a, block_b, block_c = (ci.block_cidr_for(i) for i in (ip_a, ip_b, ip_c))
    assert len({block_a, block_b, block_c}) == 3

    data = env.json("pool", "remove", "10.20.0.0/24")
    released = {(r["host"], r["block"], r["block_deleted"])
                for r in data[0]["released_affinities"]}
    assert released == {(HOST, str(block_a), False), (OTHER, str(block_b), False),
                        ("host-c", str(block_c), True)}
    assert [str(p.cidr) for p in env.ipam.pools(4)] == ["10.50.0.0/24"]
    # no affinity key of the pool is left; the other pool is untouched
    assert env.ipam.affine_blocks(HOST, 4) == [ci.block_cidr_for(ip_keep)]
    assert env.ipam.affine_blocks(OTHER, 4) == []
    assert env.ipam.affine_blocks("host-c", 4) == []
    # blocks with addresses stay (no affinity), the empty one is gone
    blocks = env.ipam.list_blocks(4)
    assert block_c not in blocks
    assert blocks[block_a].host is None and blocks[block_a].allocated() == [ip_a]
    assert blocks[block_b].host is None
    # releasing the last address of a non-affine block deletes it
    env.ok("ipam", "release", str(ip_a))
    assert block_a not in env.ipam.list_blocks(4)

    assert "pool 10.20.0.0/24 not found" in env.fail("pool", "remove", "10.20.0.0/24")
    assert "not a valid CIDR" in env.fail("pool", "remove", "nonsense")
    out = env.ok("pool", "remove", "10.50.0.0/24")
    assert out.startswith("Removed pool 10.50.0.0/24\n  released affinity of host host-a")


def test_host_remove_releases_the_hosts_blocks_and_forgets_it(env, monkeypatch):
    monkeypatch.setattr(ctl_base, "POOL_REMOVE_GRACE", 0.0)
    from backends.calico import hosts
    env.ok("pool", "add", "10.20.0.0/24")
    within = ci.ipaddress.ip_network("10.20.0.0/24")
    gone = [env.ipam.auto_assign_one(4, OTHER, within=within) for _ in range(2)]
    mine = env.ipam.auto_assign_one(4, HOST, within=within)
    # a container of this host borrowed an address of the removed host's block
    borrowed = gone[1]
    env.put_endpoint(EID1, [f"{borrowed}/32"], ["net"], host=HOST)
    env.store.put(f"/calico/v1/host/{OTHER}/bird_ip", "192.0.2.2")
    env.put_endpoint(EID2, [f"{gone[0]}/32"], ["net"], host=OTHER)

    assert "still has 1 workload endpoint" in env.fail("host", "remove", OTHER)
    assert "is this host" in env.fail("host", "remove", HOST)
    assert "invalid host name" in env.fail("host", "remove", "a/b")
    data = env.json("host", "remove", OTHER, "--force")
    assert data["endpoint_records_removed"] == [keys.endpoint(OTHER, EID2)]
    block = ci.block_cidr_for(gone[0])
    assert data["blocks_released"] == [str(block)]     # the borrowed address stays
    assert data["addresses_released"] == [str(gone[0])]
    assert env.ipam.affine_blocks(OTHER, 4) == []
    stored = env.ipam.read_block(block)
    assert stored.host is None and stored.allocated() == [borrowed]
    assert env.ipam.affine_blocks(HOST, 4) == [ci.block_cidr_for(mine)]
    assert env.ipam.read_block(ci.block_cidr_for(mine)).allocated() == [mine]
    with pytest.raises(Exception):
        env.store.get(f"/calico/v1/host/{OTHER}/bird_ip")
    assert OTHER in hosts.removed_hosts(env.store)
    out = env.ok("host", "remove", OTHER)               # again: nothing left, no error
    assert out.startswith(f"Removed host {OTHER}")


# --------------------------------------------------------------------------
# profiles, tags, rules


def test_profile_add_show_remove(env):
    assert env.ok("profile", "add", "WEB") == "Created profile WEB\n"
    assert env.get(keys.profile_tags("WEB")) == ["WEB"]
    assert env.get(keys.profile_rules("WEB")) == {
        "inbound_rules": [{"action": "allow", "src_tag": "WEB"}],
        "outbound_rules": [{"action": "allow"}]}
    assert env.get(keys.profile_labels("WEB")) == {}
    env.store.put(keys.profile_rules("WEB"), json.dumps({"inbound_rules": [],
                                                         "outbound_rules": []}))
    assert env.ok("profile", "add", "WEB") == "Profile WEB already exists.\n"
    assert env.get(keys.profile_rules("WEB"))["inbound_rules"] == []   # not clobbered
    env.ok("profile", "add", "db.v1-x_y")
    assert "invalid profile name" in env.fail("profile", "add", "bad name")
    assert "invalid profile name" in env.fail("profile", "add", "a/b")

    assert env.ok("profile", "show") == (
        "+-----------+\n|    Name   |\n+-----------+\n| WEB       |\n| db.v1-x_y |\n"
        "+-----------+\n")
    assert env.json("profile", "show") == [{"name": "WEB"}, {"name": "db.v1-x_y"}]

    env.put_endpoint(EID1, ["10.0.0.1/32"], ["WEB"])
    env.put_endpoint(EID2, ["10.0.0.2/32"], ["WEB", "db.v1-x_y"], host=OTHER)
    detailed = env.ok("profile", "show", "--detailed")
    assert f"| WEB       | host-a | libnetwork      | libnetwork  | {EID1} | active |" \
        in detailed
    data = {p["name"]: [e["endpoint_id"] for e in p["endpoints"]]
            for p in env.json("profile", "show", "--detailed")}
    assert data == {"WEB": [EID1, EID2], "db.v1-x_y": [EID2]}

    err = env.fail("profile", "remove", "WEB")
    assert "profile WEB is in use by 2 endpoint(s)" in err and "--no-check" in err
    env.store.delete(keys.endpoint(HOST, EID1))
    env.store.delete(keys.endpoint(OTHER, EID2))
    env.store.put(keys.network("WEB"), json.dumps({"NetworkID": "WEB"}))
    assert "belongs to an existing Docker network" in env.fail("profile", "remove", "WEB")
    env.store.delete(keys.network("WEB"))
    assert env.ok("profile", "remove", "WEB") == "Deleted profile WEB\n"
    assert env.store.list_prefix(keys.profile_dir("WEB")) == []
    env.put_endpoint(EID1, ["10.0.0.1/32"], ["db.v1-x_y"])
    assert env.json("profile", "remove", "db.v1-x_y", "--no-check") == \
        {"deleted": True, "profile": "db.v1-x_y"}
    assert "profile nosuch not found" in env.fail("profile", "remove", "nosuch")
    assert env.ok("profile", "show").count("\n") == 4   # header only


def test_profile_tags(env):
    env.ok("profile", "add", "WEB")
    assert env.ok("profile", "WEB", "tag", "show") == "WEB\n"
    assert env.ok("profile", "WEB", "tag", "add", "DB") == "Tag DB added to profile WEB\n"
    assert env.ok("profile", "WEB", "tag", "add", "DB") == \
        "Tag DB is already on profile WEB\n"
    assert env.json("profile", "WEB", "tag", "show") == ["WEB", "DB"]
    assert env.get(keys.profile_tags("WEB")) == ["WEB", "DB"]
    assert env.ok("profile", "WEB", "tag", "remove", "WEB") == \
        "Tag WEB removed from profile WEB\n"
    assert env.get(keys.profile_tags("WEB")) == ["DB"]
    assert "tag XX is not on profile WEB" in env.fail("profile", "WEB", "tag", "remove", "XX")
    assert "invalid tag name" in env.fail("profile", "WEB", "tag", "add", "x y")
    assert "profile nosuch not found" in env.fail("profile", "nosuch", "tag", "show")
    env.fail("profile", "WEB", "tag", "add", rc=2)
    env.fail("profile", "WEB", "tag", "list", rc=2)
    env.fail("profile", "WEB", rc=2)
    env.fail("profile", rc=2)


def test_profile_rules(env):
    env.ok("profile", "add", "WEB")
    assert env.ok("profile", "WEB", "rule", "show") == (
        "Inbound rules:\n   1 allow from tag WEB\nOutbound rules:\n   1 allow\n")
    env.ok("profile", "WEB", "rule", "add", "inbound", "allow", "tcp", "to", "ports", "80,443")
    env.ok("profile", "WEB", "rule", "add", "inbound", "allow", "icmp", "type", "8")
    env.ok("profile", "WEB", "rule", "add", "inbound", "--at=1", "deny", "from",
           "10.9.0.0/16")
    env.ok("profile", "WEB", "rule", "add", "outbound", "--at", "0", "deny", "udp", "to",
           "ports", "53")
    assert env.ok("profile", "WEB", "rule", "add", "inbound", "allow", "icmp", "type",
                  "8") == "Rule already present, skipping.\n"
    assert env.ok("profile", "WEB", "rule", "show") == (
        "Inbound rules:\n"
        "   1 deny from cidr 10.9.0.0/16\n"
        "   2 allow from tag WEB\n"
        "   3 allow tcp to ports 80,443\n"
        "   4 allow icmp type 8\n"
        "Outbound rules:\n"
        "   1 deny udp to ports 53\n"
        "   2 allow\n")
    stored = env.get(keys.profile_rules("WEB"))
    assert stored["inbound_rules"][2] == {"action": "allow", "protocol": "tcp",
                                          "dst_ports": [80, 443]}
    assert env.json("profile", "WEB", "rule", "show") == stored
    assert json.loads(env.ok("profile", "WEB", "rule", "json")) == stored

    env.ok("profile", "WEB", "rule", "remove", "inbound", "--at=1")
    env.ok("profile", "WEB", "rule", "remove", "inbound", "allow", "tcp", "to", "ports",
           "80,443")
    env.ok("profile", "WEB", "rule", "remove", "outbound", "deny", "udp", "to", "ports", "53")
    assert env.get(keys.profile_rules("WEB")) == {
        "inbound_rules": [{"action": "allow", "src_tag": "WEB"},
                          {"action": "allow", "protocol": "icmp", "icmp_type": 8}],
        "outbound_rules": [{"action": "allow"}]}

    assert "rule not found" in env.fail("profile", "WEB", "rule", "remove", "inbound", "deny")
    assert "position 9 is out of range" in env.fail("profile", "WEB", "rule", "remove",
                                                    "inbound", "--at=9")
    assert "position 7 is out of range" in env.fail("profile", "WEB", "rule", "add",
                                                    "inbound", "--at=7", "allow")
    assert "ports are not valid" in env.fail("profile", "WEB", "rule", "add", "inbound",
                                             "allow", "from", "ports", "22")
    assert "profile nosuch not found" in env.fail("profile", "nosuch", "rule", "show")
    env.fail("profile", "WEB", "rule", "add", "sideways", "allow", rc=2)
    env.fail("profile", "WEB", "rule", "add", "inbound", rc=2)
    env.fail("profile", "WEB", "rule", "add", "inbound", "--at=x", "allow", rc=2)
    env.fail("profile", "WEB", "rule", "remove", "inbound", "--at=1", "allow", rc=2)
    env.fail("profile", "WEB", "rule", "frobnicate", rc=2)

    new = {"inbound_rules": [{"action": "deny"}], "outbound_rules": []}
    assert env.ok("profile", "WEB", "rule", "update", stdin=json.dumps(new)) == \
        "Successfully updated rules on profile WEB\n"
    assert env.get(keys.profile_rules("WEB")) == new
    code, _, err = env.run("profile", "WEB", "rule", "update", stdin="{not json")
    assert code == 1 and "rules JSON on stdin is invalid" in err
    code, _, err = env.run("profile", "WEB", "rule", "update",
                           stdin='{"inbound_rules": [{"action": "maybe"}]}')
    assert code == 1 and "unknown action 'maybe'" in err


@pytest.mark.parametrize("rule, message", [
    ({"action": "allow", "dst_ports": [80]}, "dst_ports needs protocol tcp"),
    ({"action": "allow", "protocol": "tcp", "dst_ports": [70000]}, "dst_ports entry must"),
    ({"protocol": "icmp", "icmp_code": 3}, "icmp_code needs icmp_type"),
    ({"src_net": "10.0.0.0/8", "dst_net": "fd00::/8"}, "mixes IPv4 and IPv6"),
    ({"src_tag": "no spaces allowed"}, "src_tag is not a valid tag"),
    ({"protocol": "gopher"}, "unknown protocol 'gopher'"),
    ({"action": "allow", "dst_prts": [80]}, "unknown rule field(s) dst_prts"),
])
def test_rule_update_refuses_what_the_policy_compiler_rejects(env, rule, message):
    """``rule update`` stores only rules the nftables compiler accepts: a rule
    it would reject (skipped by every agent) is refused with the reason."""
    from backends.calico import policy

    env.ok("profile", "add", "WEB")
    before = env.get(keys.profile_rules("WEB"))
    with pytest.raises(policy.InvalidRule):
        policy.compile_rule(rule)
    data = {"inbound_rules": [{"action": "allow", "src_tag": "WEB"}, rule],
            "outbound_rules": []}
    code, out, err = env.run("profile", "WEB", "rule", "update", stdin=json.dumps(data))
    assert code == 1 and out == "", (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "netpluginctl: error: rules JSON: inbound_rules rule 2 "), err
    assert "is not a valid rule: " in err and message in err, err
    assert env.get(keys.profile_rules("WEB")) == before        # nothing written
    # valid rules are stored
    good = {"inbound_rules": [{"action": "allow", "protocol": "tcp", "dst_ports": [80]}],
            "outbound_rules": [{"action": "next-tier"}]}
    env.ok("profile", "WEB", "rule", "update", stdin=json.dumps(good))
    assert env.get(keys.profile_rules("WEB")) == good


# --------------------------------------------------------------------------
# endpoints


def test_endpoint_show(env):
    env.put_endpoint(EID1, ["10.0.0.1/32", "fd00::1/128"], ["WEB"])
    env.put_endpoint(EID2, ["10.0.0.2/32"], ["WEB", "DB"])
    env.put_endpoint(EID3, ["10.0.1.3/32"], ["DB"], host=OTHER)
    env.store.put(f"/calico/v1/host/{HOST}/bird_ip", "10.1.1.1")   # not an endpoint
    out = env.ok("endpoint", "show")
    assert "| Hostname | Orchestrator ID | Number of Endpoints |" in out
    assert "| host-a   | libnetwork      | 2                   |" in out
    assert "| host-b   | libnetwork      | 1                   |" in out
    assert env.json("endpoint", "show", "--host=host-b") == \
        [{"hostname": "host-b", "orchestrator_id": "libnetwork", "endpoints": 1}]

    detailed = env.ok("endpoint", "show", "--detailed")
    assert f"| host-a   | libnetwork      | libnetwork  | {EID1} | 10.0.0.1/32 " in detailed
    assert "| fd00::1/128 |" in detailed
    assert "WEB,DB" in detailed
    rows = env.json("endpoint", "show", "--detailed", "--host", HOST, "--endpoint", "2222")
    assert [(r["endpoint_id"], r["addresses"], r["profile_ids"], r["mac"]) for r in rows] == \
        [(EID2, ["10.0.0.2/32"], ["WEB", "DB"], "ee:ee:ee:ee:ee:ee")]
    assert env.json("endpoint", "show", "--orchestrator=docker") == []
    # a corrupt endpoint is shown (without data) with one warning line
    env.store.put(keys.endpoint(OTHER, "f" * 64), "{garbage")
    code, out, err = env.run("endpoint", "show", "--host", OTHER, "--detailed")
    assert code == 0 and "f" * 64 in out
    assert err == f"netpluginctl: warning: endpoint {keys.endpoint(OTHER, 'f' * 64)} is " \
        "not a JSON object\n"
    assert env.json("endpoint", "show", "--workload=libnetwork", "--detailed") != []
    env.fail("endpoint", rc=2)
    env.fail("endpoint", "show", "--bogus", rc=2)
    env.fail("endpoint", EID1, rc=2)


def test_endpoint_profiles(env):
    for name in ("WEB", "DB", "OPS"):
        env.ok("profile", "add", name)
    env.put_endpoint(EID1, ["10.0.0.1/32"], ["WEB"])
    env.put_endpoint(EID2, ["10.0.0.2/32"], ["WEB"], host=OTHER)
    key = keys.endpoint(HOST, EID1)
    assert env.ok("endpoint", EID1, "profile", "show") == \
        "+------+\n| Name |\n+------+\n| WEB  |\n+------+\n"
    assert env.json("endpoint", EID1[:8], "profile", "append", "DB", "OPS") == \
        {"endpoint_id": EID1, "hostname": HOST, "profile_ids": ["WEB", "DB", "OPS"]}
    before = env.get(key)
    assert before["profile_ids"] == ["WEB", "DB", "OPS"]
    assert before["ipv4_nets"] == ["10.0.0.1/32"] and before["name"] == "cali" + EID1[:11]
    env.ok("endpoint", EID1, "profile", "remove", "WEB")
    assert env.get(key)["profile_ids"] == ["DB", "OPS"]
    env.ok("endpoint", EID1, "profile", "set", "OPS", "WEB")
    assert env.get(key)["profile_ids"] == ["OPS", "WEB"]
    assert env.json("endpoint", EID1, "profile", "show") == ["OPS", "WEB"]
    env.ok("endpoint", EID1, "profile", "set")
    assert env.get(key)["profile_ids"] == []
    env.ok("endpoint", EID2, "profile", "append", "DB", "--host", OTHER)
    assert env.get(keys.endpoint(OTHER, EID2))["profile_ids"] == ["WEB", "DB"]

    assert "already in the profile list" in env.fail("endpoint", EID2, "profile", "append",
                                                     "WEB")
    assert "not in the profile list" in env.fail("endpoint", EID2, "profile", "remove", "OPS")
    assert "profile nosuch not found" in env.fail("endpoint", EID2, "profile", "append",
                                                  "nosuch")
    assert "endpoint 9999 not found" in env.fail("endpoint", "9999", "profile", "show")
    env.put_endpoint(EID1[:63] + "2", ["10.0.0.9/32"], [])
    assert "is ambiguous" in env.fail("endpoint", "1111", "profile", "show")
    env.fail("endpoint", EID1, "profile", "append", rc=2)
    # a deleted profile can still be removed from an endpoint
    env.store.put(key, json.dumps({**env.get(key), "profile_ids": ["gone", "DB"]}))
    env.ok("endpoint", EID1, "profile", "remove", "gone")
    assert env.get(key)["profile_ids"] == ["DB"]


def test_endpoint_profile_change_is_compare_and_swap(etcd_env, monkeypatch):
    """A write between our read and our write is not lost: the CAS fails, we
    re-read and apply the change again."""
    env = etcd_env
    for name in ("WEB", "DB", "OPS"):
        env.ok("profile", "add", name)
    env.put_endpoint(EID1, ["10.0.0.1/32"], ["WEB"])
    key = keys.endpoint(HOST, EID1)
    real_open = ctl_cli.open_datastore
    cas_calls = []

    def open_racy(cfg):
        store = real_open(cfg)
        real_cas = store.compare_and_swap

        def racy_cas(k, value, version):
            cas_calls.append(k)
            if len(cas_calls) == 1:      # someone else appends OPS meanwhile
                other = env.get(key)
                other["profile_ids"].append("OPS")
                env.store.put(key, json.dumps(other))
            return real_cas(k, value, version)

        store.compare_and_swap = racy_cas
        return store

    monkeypatch.setattr(ctl_cli, "open_datastore", open_racy)
    env.ok("endpoint", EID1, "profile", "append", "DB")
    assert cas_calls == [key, key]
    assert env.get(key)["profile_ids"] == ["WEB", "OPS", "DB"]


def test_a_key_that_keeps_changing_is_one_clear_error(env, monkeypatch):
    """Datastore.update gives up after its retries: one line, nothing written."""
    from netplugin.datastore import CompareFailed

    env.ok("profile", "add", "WEB")

    def always_lose(key, value, version):
        raise CompareFailed(key)

    monkeypatch.setattr(env.store, "compare_and_swap", always_lose)
    with pytest.raises(ctl.CtlError, match="^tags of profile WEB kept changing "
                                           "concurrently; try again$"):
        ctl.Ctl(env.cfg, env.store, out=io.StringIO()).tag_add("WEB", "OPS")
    assert env.get(keys.profile_tags("WEB")) == ["WEB"]


def test_endpoint_profile_concurrent_appends(etcd_env):
    env = etcd_env
    names = [f"p{i}" for i in range(8)]
    for name in names:
        env.ok("profile", "add", name)
    env.put_endpoint(EID1, ["10.0.0.1/32"], [])
    errors = []

    def append(name):
        store = EtcdDatastore(env.cfg.datastore.endpoints)
        try:
            ctl.Ctl(env.cfg, store, out=io.StringIO()).endpoint_profile_change(
                "append", EID1, [name], None, None, None)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=append, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(env.get(keys.endpoint(HOST, EID1))["profile_ids"]) == names


# --------------------------------------------------------------------------
# IPAM


def test_ipam_info_and_release(env):
    env.ok("pool", "add", "10.60.0.0/24")
    ip = env.ipam.auto_assign_one(4, HOST)
    ip2 = env.ipam.assign_ip("10.60.0.200", OTHER, handle_id="h1", secondary={"k": "v"})
    out = env.ok("ipam", "info", str(ip))
    assert out.startswith(f"IP {ip} is in use\n")
    assert f"| Block affinity | {HOST}" in out
    assert f"No attributes defined for {ip}" in out
    info = env.json("ipam", "info", str(ip2))
    assert info["assigned"] is True and info["handle_id"] == "h1"
    assert info["attributes"] == {"k": "v"} and info["pool"] == "10.60.0.0/24"
    assert info["block"] == "10.60.0.192/26" and info["block_affinity"] == OTHER
    assert env.ok("ipam", "info", "10.60.0.77") == "IP 10.60.0.77 is not currently assigned\n"
    assert env.json("ipam", "info", "10.60.0.77")["assigned"] is False
    assert "not in any configured Calico pool" in env.fail("ipam", "info", "10.99.0.1")
    assert "not a valid IP address" in env.fail("ipam", "info", "10.60.0.300")

    # an address an endpoint still uses is refused unless --force
    env.put_endpoint(EID1, [f"{ip}/32"], [])
    assert env.json("ipam", "info", str(ip))["endpoints"][0]["endpoint_id"] == EID1
    err = env.fail("ipam", "release", str(ip))
    assert f"belongs to endpoint {EID1}" in err and "--force" in err
    assert env.ok("ipam", "release", "--force", str(ip)) == "Address successfully released\n"
    assert env.json("ipam", "release", f"--ip={ip2}") == {"ip": str(ip2), "released": True}
    assert env.ipam.read_block(ci.block_cidr_for(ip)).allocated() == []
    assert "handle" not in json.dumps([i.key for i in env.store.list_prefix(ci.HANDLE_ROOT)])
    assert f"IP {ip} is not assigned" in env.fail("ipam", "release", str(ip), "--force")
    env.fail("ipam", "release", rc=2)
    env.fail("ipam", "release", str(ip), "--ip", str(ip), rc=2)


# --------------------------------------------------------------------------
# errors, config, console script


def test_unreachable_etcd_is_one_line(tmp_path, capsys):
    cfg = write_config(tmp_path, "etcd", f"http://127.0.0.1:{free_port()}")
    for args in (["pool", "show"], ["profile", "add", "X"], ["endpoint", "show"],
                 ["ipam", "info", "10.0.0.1"]):
        assert ctl.main(["-f", cfg, *args]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.splitlines() == [err.strip()]
        assert err.startswith("netpluginctl: error: etcd at http://127.0.0.1:")
        assert "unreachable: connection refused" in err


def test_config_errors(tmp_path, capsys):
    import logging
    handlers = list(logging.getLogger().handlers)
    assert ctl.main(["-f", str(tmp_path / "none.cfg"), "pool", "show"]) == 1
    assert capsys.readouterr().err == \
        f"netpluginctl: error: {tmp_path}/none.cfg: config file not found\n"
    nuage = tmp_path / "nuage.cfg"
    nuage.write_text('backend = "nuage"\n')
    assert ctl.main(["-f", str(nuage), "pool", "show"]) == 1
    assert "manages the calico backend's data only" in capsys.readouterr().err
    assert ctl.main(["--version"]) == 0
    assert ctl.main([]) == 2
    assert ctl.main(["frobnicate"]) == 2
    assert ctl.main(["--help"]) == 0
    assert "profile <PROFILE> rule add" in capsys.readouterr().out
    assert ctl.main(["profile", "WEB", "rule", "add", "--help"]) == 0
    out = capsys.readouterr().out
    assert "netpluginctl profile <PROFILE> rule add (inbound|outbound)" in out
    assert "[from [ports <P>]" in out and "endpoint show" not in out
    assert ctl.main(["-f", "x.cfg", "endpoint", "-h"]) == 0
    assert "[--endpoint=<E>] [--detailed]" in capsys.readouterr().out
    assert logging.getLogger().handlers == handlers      # main() restored logging


def test_config_from_environment(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path, "embedded")
    monkeypatch.setenv("NETPLUGIN_CONFIG", cfg)
    assert ctl.main(["pool", "add", "10.70.0.0/24"]) == 0
    assert ctl.main(["pool", "show", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("["):])[0]["cidr"] == "10.70.0.0/24"


def _cli(argv, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=60, **kw)


def test_console_script_and_launcher(etcd_env, tmp_path):
    assert os.access(CONSOLE_SCRIPT, os.X_OK), "run: .venv/bin/pip install -e ."
    env = etcd_env
    r = _cli([CONSOLE_SCRIPT, "-f", env.cfg_path, "pool", "add", "10.80.0.0/16", "--ipip"])
    assert (r.returncode, r.stdout, r.stderr) == (0, "Added pool 10.80.0.0/16\n", "")
    r = _cli([CONSOLE_SCRIPT, "pool", "show", "--ipv4", "--json", "-f", env.cfg_path])
    assert r.returncode == 0 and json.loads(r.stdout)[0]["ipip"] is True
    r = _cli([CONSOLE_SCRIPT, "-f", env.cfg_path, "pool", "add", "10.80.1.0/24"])
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == ["netpluginctl: error: cannot add pool 10.80.1.0/24: it "
                                     "overlaps the existing pool 10.80.0.0/16 (only an "
                                     "identical CIDR can be updated)"]
    bad = write_config(tmp_path / "..", "etcd", f"http://127.0.0.1:{free_port()}")
    r = _cli([CONSOLE_SCRIPT, "-f", bad, "profile", "show"])
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert "Traceback" not in r.stderr and "connection refused" in r.stderr
    r = _cli([CONSOLE_SCRIPT, "pool", "add"])
    assert r.returncode == 2 and "usage:" in r.stderr
    # ./netpluginctl: NETPLUGIN_CONFIG (else plugin.cfg beside it)
    r = _cli([LAUNCHER, "profile", "add", "WEB"],
             env={**os.environ, "NETPLUGIN_CONFIG": env.cfg_path})
    assert (r.returncode, r.stdout) == (0, "Created profile WEB\n"), r.stderr
    assert env.get(keys.profile_tags("WEB")) == ["WEB"]


def test_docker_network_name_resolves_to_profile(env):
    """``[calico] docker_endpoint`` answering: a network name finds its profile."""
    nid = "ab" * 32
    env.ok("profile", "add", nid)

    def routes(method, path):
        if path.endswith("/version"):
            return 200, {"ApiVersion": "1.41", "Version": "20.10.0", "MinAPIVersion": "1.12"}
        if path.endswith("/networks/web"):
            return 200, {"Id": nid, "Name": "web", "Driver": "calico"}
        return 404, {"message": "not found"}

    server = serve_unix(str(env.tmp / "docker.sock"), routes)
    try:
        assert env.json("profile", "web", "tag", "show") == [nid]
        env.ok("profile", "web", "rule", "add", "inbound", "allow", "tcp", "to", "ports", "80")
        assert len(env.get(keys.profile_rules(nid))["inbound_rules"]) == 2
        assert "profile other not found" in env.fail("profile", "other", "rule", "show")
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------
# status and diags


def test_status_in_process(env, fake_plugin):
    env.put_endpoint(EID1, ["10.0.0.1/32", "fd00::1/128"], ["WEB"])
    env.put_endpoint(EID2, ["10.0.0.2/32"], ["WEB"])
    env.put_endpoint(EID3, ["10.0.0.3/32"], ["WEB"], host=OTHER)
    FAKE_IP.update({
        ("link", "show"): [{"ifname": "lo", "operstate": "UNKNOWN"},
                           {"ifname": "cali" + EID1[:11], "operstate": "UP"}],
        ("route", "show"): [{"dst": "default", "gateway": "10.1.1.1", "dev": "eth0"},
                            {"dst": "10.0.0.1", "dev": "cali" + EID1[:11], "scope": "link"}],
        ("-6", "route", "show"): [{"dst": "fd00::1", "dev": "cali" + EID1[:11]}],
        ("route", "show", "proto", "78"): [
            {"dst": "10.0.1.0/26", "gateway": "10.99.0.12", "dev": "eth0"}],
    })
    env.store.put(f"/calico/v1/host/{HOST}/bird_ip", "10.99.0.11")
    env.store.put(f"/calico/v1/host/{OTHER}/bird_ip", "10.99.0.12")
    st = env.json("status")
    assert st["hosts"] == [{"host": HOST, "ip": "10.99.0.11", "self": True},
                           {"host": OTHER, "ip": "10.99.0.12", "self": False}]
    assert st["cross_host_routes"] == [
        {"dst": "10.0.1.0/26", "via": "10.99.0.12", "dev": "eth0"}]
    assert st["ok"] is True and st["hostname"] == HOST
    assert st["datastore"]["ok"] is True
    assert st["plugin"] == {"socket": fake_plugin, "ok": True,
                            "implements": ["NetworkDriver", "IpamDriver"]}
    assert [(r["family"], r["dst"]) for r in st["routes"]] == [(4, "10.0.0.1"), (6, "fd00::1")]
    eps = {e["endpoint_id"]: e for e in st["endpoints"]}
    assert set(eps) == {EID1, EID2}
    assert (eps[EID1]["link"], eps[EID1]["routed"]) == ("up", True)
    assert (eps[EID2]["link"], eps[EID2]["routed"], eps[EID2]["missing_routes"]) == \
        ("missing", False, ["10.0.0.2/32"])
    out = env.ok("status")
    assert "Datastore: " in out and ": reachable" in out
    assert "answering (implements NetworkDriver, IpamDriver)" in out
    assert "Health:    healthy" in out and "datastore: ok: answers" in out
    assert "Endpoints on host-a: 2" in out and "NO: 10.0.0.2/32" in out
    assert "Routes via cali* interfaces: 2" in out
    assert "Hosts publishing an address (bird_ip): 2" in out and "(this host)" in out
    assert "Cross-host routes (proto 78): 1" in out and "10.99.0.12" in out


def test_status_reports_what_is_down(tmp_path, capsys):
    cfg = write_config(tmp_path, "etcd", f"http://127.0.0.1:{free_port()}")
    assert ctl.main(["-f", cfg, "--json", "status"]) == 1
    st = json.loads(capsys.readouterr().out)
    assert st["ok"] is False
    assert "connection refused" in st["datastore"]["error"]
    assert st["plugin"]["ok"] is False and "socket not found" in st["plugin"]["error"]
    assert ctl.main(["-f", cfg, "status"]) == 1
    out = capsys.readouterr().out
    assert "NOT reachable" in out and "NOT answering" in out


def test_diags_in_process(env, tmp_path):
    env.ok("pool", "add", "10.90.0.0/24")
    log = tmp_path / "plugin.log"
    log.write_text("a log line\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    os.makedirs(env.cfg.driver_state_dir)
    with open(os.path.join(env.cfg.driver_state_dir, "gateways.json"), "w") as f:
        f.write("{}")
    res = env.json("diags", "--output", str(out_dir), "--log", str(log), "--log",
                   str(tmp_path / "missing.log"))
    assert res["path"].startswith(str(out_dir)) and res["path"].endswith(".tar.gz")
    assert any("missing.log" in e for e in res["errors"])
    with tarfile.open(res["path"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        top = tar.getnames()[0].split("/")[0]
        dump = json.load(tar.extractfile(f"{top}/datastore.json"))
        assert tar.extractfile(f"{top}/logs/0-plugin.log").read() == b"a log line\n"
    assert {f"config/{os.path.basename(env.cfg_path)}", "datastore.json", "status.json",
            "ip-route.json", "ip-6-route.json", "ip-link.json", "ip-addr.json",
            "nft-ruleset.json", "errors.txt", "state/gateways.json"} <= names
    assert {"key": "/calico/v1/ipam/v4/pool/10.90.0.0-24", "value": '{"cidr": "10.90.0.0/24"}'} \
        .items() <= dump["keys"][0].items()
    assert "does not exist" in env.fail("diags", "--output", str(tmp_path / "nope"))
    assert stat.S_IMODE(os.stat(res["path"]).st_mode) == 0o600


def test_diags_default_is_a_private_directory_and_0600(env, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = env.json("diags")
    where = os.path.dirname(res["path"])
    assert os.path.dirname(where) == str(tmp_path)
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(res["path"]).st_mode) == 0o600


def _in_netns(script: str, **kw):
    """Run a shell script in a throwaway network namespace."""
    return _cli(["unshare", "--net", "sh", "-ec", script], **kw)


@NEEDS_NETNS
def test_status_and_diags_in_a_network_namespace(tmp_path, fake_plugin):
    cfg = write_config(tmp_path, "embedded")
    store = EmbeddedDatastore(str(tmp_path / "state.db"))
    ifname = "cali" + EID1[:11]
    store.put(keys.endpoint(HOST, EID1), json.dumps({
        "state": "active", "name": ifname, "mac": "ee:ee:ee:ee:ee:ee", "profile_ids": ["W"],
        "labels": {}, "ipv4_nets": ["10.0.0.1/32"], "ipv6_nets": []}))
    store.close()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    log = tmp_path / "plugin.log"
    log.write_text("plugin says hi\n")
    script = (f"ip link add {ifname} type veth peer name tmp{EID1[:11]}\n"
              f"ip link set tmp{EID1[:11]} up\nip link set {ifname} up\n"
              f"ip route add 10.0.0.1/32 dev {ifname}\n"
              f"{CONSOLE_SCRIPT} -f {cfg} --json status\n"
              f"{CONSOLE_SCRIPT} -f {cfg} diags --output {out_dir} --log {log}\n")
    r = _in_netns(script)
    assert r.returncode == 0, r.stderr
    decoder = json.JSONDecoder()
    st, end = decoder.raw_decode(r.stdout)
    assert st["ok"] is True and st["plugin"]["ok"] is True
    assert st["routes"] == [{"family": 4, "dst": "10.0.0.1", "dev": ifname, "scope": "link"}]
    assert [(e["endpoint_id"], e["link"], e["routed"]) for e in st["endpoints"]] == \
        [(EID1, "up", True)]
    line = r.stdout[end:].strip()
    assert line.startswith(f"Diagnostics saved to {out_dir}/netplugin-diags-host-a-")
    path = line.split(" saved to ", 1)[1]
    with tarfile.open(path) as tar:
        top = tar.getnames()[0].split("/")[0]
        routes = json.load(tar.extractfile(f"{top}/ip-route.json"))
        links = json.load(tar.extractfile(f"{top}/ip-link.json"))
        nft = tar.extractfile(f"{top}/nft-ruleset.json").read()
        assert tar.extractfile(f"{top}/logs/0-plugin.log").read() == b"plugin says hi\n"
        errors = tar.extractfile(f"{top}/errors.txt").read().decode()
    assert {"dst": "10.0.0.1", "dev": ifname} .items() <= routes[0].items()
    assert {l["ifname"] for l in links} == {"lo", ifname, "tmp" + EID1[:11]}
    if shutil.which("nft"):
        assert b"nftables" in nft and errors == ""


@NEEDS_NETNS
def test_status_in_a_network_namespace_without_datastore(tmp_path, etcd_url):
    """The etcd on the machine's 127.0.0.1 is out of reach from the namespace."""
    cfg = write_config(tmp_path, "etcd", etcd_url)
    r = _in_netns(f"{CONSOLE_SCRIPT} -f {cfg} status")
    assert r.returncode == 1
    assert "NOT reachable" in r.stdout and "NOT answering" in r.stdout
    assert "Endpoints on host-a: 0" in r.stdout
