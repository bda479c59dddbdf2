"""VrsClient (backends/nuage/vrs.py) against a real ovsdb-server.

ovsdb-server runs with the stock schema + the Nuage tables on a unix socket in
a temp dir, inside its own network namespace (``unshare --net``: it creates no
interface anyway, and nothing here touches the machine's namespace).  No
ovs-vswitchd: only the OVSDB side is tested here; the datapath is in the e2e
tests.
"""
import ctypes
import os
import signal
import subprocess
import threading
import time

import pytest

from backends.nuage.network import NuageNetwork
from backends.nuage.vport import VPort
from backends.nuage.vrs import (ResolveTimeout, VrsClient, VrsError, VrsUnavailable,
                                vrs_remote)
from tests.netns_runner import netns_unavailable_reason
from tests.nuage import ovsdb_util
from tests.nuage.schema import STOCK_SCHEMA, write_merged
from tests.nuage.vrs_lab import OVSDB_SERVER, OVSDB_TOOL, missing_ovs

NET = NuageNetwork("n" * 64, "Enterprise", "Domain", "Zone", "Subnet 2", "admin",
                   "10.21.59.0/24", "10.21.59.1")


def _skip_reason():
    missing = missing_ovs()
    if missing:
        return "Open vSwitch binaries missing: " + ", ".join(missing)
    return netns_unavailable_reason()


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _die_with_parent():
    """unshare dies with the test process (and --kill-child takes ovsdb-server
    with it), even if pytest is SIGKILLed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


class Server:
    """ovsdb-server on ``dir/db.sock``, in a private network namespace."""

    def __init__(self, tmp, stock_only=False):
        self.dir = str(tmp)
        self.db = os.path.join(self.dir, "conf.db")
        self.sock = os.path.join(self.dir, "db.sock")
        self.remote = "unix:" + self.sock
        schema = STOCK_SCHEMA if stock_only else write_merged(
            os.path.join(self.dir, "schema.json"))
        subprocess.run([OVSDB_TOOL, "create", self.db, schema], check=True,
                       capture_output=True)
        self.proc = None

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--fork", "--kill-child", OVSDB_SERVER, self.db,
             f"--remote=punix:{self.sock}", f"--unixctl={self.dir}/ctl",
             f"--pidfile={self.dir}/ovsdb-server.pid",
             f"--log-file={self.dir}/ovsdb-server.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 10
        while True:
            try:
                ovsdb_util.list_tables(self.remote, timeout=1)
                return self
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.02)

    def stop(self):
        """SIGTERM ovsdb-server itself (unshare --fork ignores SIGTERM; with
        --kill-child, SIGKILL of unshare is the fallback)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                with open(os.path.join(self.dir, "ovsdb-server.pid")) as f:
                    os.kill(int(f.read().strip()), signal.SIGTERM)
                self.proc.wait(10)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def add_bridge(self, name="alubr0"):
        ovsdb_util.transact(
            self.remote,
            {"op": "insert", "table": "Bridge", "row": {"name": name}, "uuid-name": "br"},
            {"op": "insert", "table": "Open_vSwitch",
             "row": {"bridges": ["set", [["named-uuid", "br"]]]}})

    def select(self, table, where=None):
        return ovsdb_util.select(self.remote, table, where)

    def resolve(self, name, ip, mask="255.255.255.0", gw="10.21.59.1"):
        """What VRS does: fill in the resolved columns."""
        ovsdb_util.transact(self.remote, {
            "op": "update", "table": "Nuage_Port_Table", "where": [["name", "==", name]],
            "row": {"ip_addr": ip, "subnet_mask": mask, "gateway": gw,
                    "vrf_id": 40001, "evpn_id": 60001}})


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path).start()
    srv.add_bridge()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    connects = []
    c = VrsClient(server.remote, "alubr0", timeout=3.0, on_connect=connects.append)
    c.connects = connects
    c.start()
    c.wait_ready(5)
    yield c
    c.stop()


def vport(name="nuv0123456789ab", vm="c" * 64, vm_name="c1", ip="10.21.59.5", eid=None):
    return VPort(name, "7a:42:00:00:00:01", "alubr0", ip, NET, eid or ("e" * 64),
                 vm, vm_name)


def test_vrs_remote_forms():
    assert vrs_remote("unix:/var/run/openvswitch/db.sock", 6633) == \
        "unix:/var/run/openvswitch/db.sock"
    assert vrs_remote("/run/db.sock", 6633) == "unix:/run/db.sock"
    assert vrs_remote("127.0.0.1", 6633) == "tcp:127.0.0.1:6633"
    assert vrs_remote("localhost", 6640) in ("tcp:127.0.0.1:6640", "tcp:[::1]:6640")
    assert vrs_remote("fd00::1", 6633) == "tcp:[fd00::1]:6633"
    with pytest.raises(VrsUnavailable, match="cannot resolve VRS host"):
        vrs_remote("no-such-host.invalid", 6633)


def test_ensure_vport_writes_every_row(server, client):
    vp = vport()
    client.ensure_vport(vp, fresh=True)
    port = server.select("Nuage_Port_Table")
    assert len(port) == 1
    port = port[0]
    assert (port["name"], port["mac"], port["bridge"], port["vm_domain"]) == \
        (vp.name, vp.mac, "alubr0", 4)
    assert (port["nuage_domain"], port["nuage_zone"], port["nuage_network"],
            port["nuage_network_type"]) == ("Domain", "Zone", "Subnet 2", "ipv4")
    assert port["metadata"] == {"nuage-enterprise-domain": "Domain",
                                "nuage-enterprise-zone": "Zone",
                                "nuage-enterprise-network": "Subnet 2",
                                "nuage-enterprise-network-type": "ipv4",
                                "static-ip": "10.21.59.5"}
    assert port["ip_addr"] == ""
    vm = server.select("Nuage_VM_Table")
    assert len(vm) == 1
    vm = vm[0]
    assert (vm["vm_uuid"], vm["vm_name"], vm["ports"]) == ("c" * 64, "c1", [vp.name])
    assert (vm["type"], vm["domain"], vm["event"], vm["event_type"], vm["state"],
            vm["reason"]) == (4, 4, 2, 0, 1, 1)
    assert (vm["nuage_user"], vm["nuage_enterprise"]) == ("admin", "Enterprise")
    assert vm["metadata"] == {"user": "admin", "enterprise": "Enterprise"}
    assert ovsdb_util.bridge_port_names(server.remote, "alubr0") == [vp.name]
    itf = server.select("Interface")[0]
    assert itf["name"] == vp.name
    assert itf["external_ids"] == {"vm-uuid": "c" * 64, "vm-name": "c1",
                                   "netplugin-endpoint": "e" * 64,
                                   "netplugin-network": "n" * 64,
                                   "netplugin-driver": "nuage"}
    assert server.select("Port")[0]["external_ids"] == itf["external_ids"]

    # re-asserting changes nothing; a fresh write replaces stale resolved values
    server.resolve(vp.name, "10.21.59.5")
    client.ensure_vport(vp, fresh=False)
    assert server.select("Nuage_Port_Table")[0]["ip_addr"] == "10.21.59.5"
    client.ensure_vport(vp, fresh=True)
    rows = server.select("Nuage_Port_Table")
    assert len(rows) == 1 and rows[0]["ip_addr"] == ""
    assert len(server.select("Port")) == 1 and len(server.select("Nuage_VM_Table")) == 1


def test_wait_resolved_and_timeout(server, client):
    vp = vport()
    client.ensure_vport(vp, fresh=True)
    t = threading.Timer(0.3, server.resolve, (vp.name, "10.21.59.5"))
    t.start()
    started = time.monotonic()
    res = client.wait_resolved(vp.name, 5)
    assert time.monotonic() - started < 3
    assert (res.ip, res.mask, res.gateway, res.prefixlen, res.vrf_id, res.evpn_id) == \
        ("10.21.59.5", "255.255.255.0", "10.21.59.1", 24, 40001, 60001)

    other = vport("nuvffffffffffff", vm="d" * 64, vm_name="c2", ip="10.21.59.6")
    client.ensure_vport(other, fresh=True)
    server.resolve(other.name, "0.0.0.0")     # "0.0.0.0" means: not yet
    started = time.monotonic()
    with pytest.raises(ResolveTimeout, match=r"did not resolve vPort nuvffffffffffff within "
                                             r"0\.5s"):
        client.wait_resolved(other.name, 0.5)
    assert 0.4 < time.monotonic() - started < 2


def test_remove_vport_is_idempotent_and_complete(server, client):
    vp = vport()
    client.ensure_vport(vp, fresh=True)
    assert client.remove_vport(vp.name) is True
    assert server.select("Nuage_Port_Table") == []
    assert server.select("Nuage_VM_Table") == []
    assert server.select("Port") == [] and server.select("Interface") == []
    assert ovsdb_util.bridge_port_names(server.remote, "alubr0") == []
    assert client.remove_vport(vp.name) is False    # absent: fine


def test_one_vm_row_per_container_with_several_vports(server, client):
    a = vport("nuvaaaaaaaaaaaa", eid="a" * 64)
    b = vport("nuvbbbbbbbbbbbb", eid="b" * 64, ip="10.21.59.9")
    client.ensure_vport(a, fresh=True)
    client.ensure_vport(b, fresh=True)
    vms = server.select("Nuage_VM_Table")
    assert len(vms) == 1 and sorted(vms[0]["ports"]) == [a.name, b.name]
    client.remove_vport(a.name)
    vms = server.select("Nuage_VM_Table")
    assert len(vms) == 1 and vms[0]["ports"] == [b.name]
    client.remove_vport(b.name)
    assert server.select("Nuage_VM_Table") == []


def test_missing_bridge_is_a_clear_error(server):
    c = VrsClient(server.remote, "br-nope", timeout=3.0)
    c.start()
    try:
        c.wait_ready(5)
        assert not c.bridge_exists()
        with pytest.raises(VrsError, match="bridge br-nope does not exist"):
            c.ensure_vport(vport(), fresh=True)
        assert server.select("Nuage_Port_Table") == [] and server.select("Port") == []
    finally:
        c.stop()


def test_unreachable_vrs_is_a_clear_bounded_error(tmp_path):
    c = VrsClient(f"unix:{tmp_path}/nothing.sock", "alubr0", timeout=1.0)
    c.start()
    try:
        started = time.monotonic()
        with pytest.raises(VrsUnavailable, match=r"nothing\.sock is not reachable.*No such "
                                                 r"file or directory"):
            c.wait_ready(1.0)
        with pytest.raises(VrsUnavailable):
            c.ensure_vport(vport(), fresh=True)
        assert time.monotonic() - started < 4
    finally:
        c.stop()


def test_plain_open_vswitch_is_refused(tmp_path):
    srv = Server(tmp_path, stock_only=True).start()
    c = VrsClient(srv.remote, "alubr0", timeout=1.0)
    c.start()
    try:
        with pytest.raises(VrsUnavailable, match="no Nuage_VM_Table, Nuage_Port_Table table"
                                                 ".*not a Nuage VRS"):
            c.wait_ready(1.5)
    finally:
        c.stop()
        srv.stop()


def test_reconnects_after_ovsdb_restart(server, client):
    vp = vport()
    client.ensure_vport(vp, fresh=True)
    assert client.connects == [1]
    server.stop()
    deadline = time.monotonic() + 10
    while client.ready and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not client.ready
    with pytest.raises(VrsUnavailable):
        client.wait_ready(0.2)
    # rows lost while the server was down (e.g. VRS restarted with a fresh DB)
    subprocess.run([OVSDB_TOOL, "transact", server.db,
                    '["Open_vSwitch", {"op": "delete", "table": "Nuage_Port_Table", '
                    '"where": []}, {"op": "delete", "table": "Nuage_VM_Table", "where": []}]'],
                   check=True, capture_output=True)
    server.start()
    client.wait_ready(10)
    deadline = time.monotonic() + 5
    while client.connects != [1, 2] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.connects == [1, 2]
    assert server.select("Nuage_Port_Table") == []
    client.ensure_vport(vp, fresh=False)          # what the backend's re-assert does
    assert [r["name"] for r in server.select("Nuage_Port_Table")] == [vp.name]
    assert server.select("Nuage_VM_Table")[0]["ports"] == [vp.name]


def test_kept_merged_schema_matches_the_fragment():
    """tests/nuage/vswitch-nuage.ovsschema = stock schema + nuage-tables.json
    (regenerate with ``python -m tests.nuage.schema`` when either changes)."""
    import json
    from tests.nuage import schema
    with open(schema.MERGED_COPY) as f:
        kept = json.load(f)
    assert {t: kept["tables"][t] for t in schema.NUAGE_TABLE_NAMES} == schema.nuage_tables()
    for t in schema.NUAGE_TABLE_NAMES:
        assert kept["tables"][t]["isRoot"] is True   # else rows vanish at commit
    with open(STOCK_SCHEMA) as f:
        stock = json.load(f)
    if stock["version"] == kept["version"]:
        assert schema.merged_schema() == kept
