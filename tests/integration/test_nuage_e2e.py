"""Nuage backend end to end: real dockerd, real ovsdb-server (stock schema +
Nuage tables), real ovs-vswitchd with the netdev bridge alubr0, the real
plugin (./plugin, backend = "nuage"), and tests/fake_vrs.py standing in for
Nuage's VRS agent.  Everything runs inside the lab host ``nu``."""
import json
import os
import re
import time

import pytest

from tests.integration.nuage_fixtures import (  # noqa: F401  (fixtures)
    SILENT_SUBNET, fake_vrs, lab_vrs, nuage_config, nuage_host, nuage_plugin)
from tests.plugin_proc import LAUNCHER, PluginProcess

pytestmark = pytest.mark.integration

OPTS = ["-o", "organization=Enterprise", "-o", "domain=Domain", "-o", "zone=Zone",
        "-o", "subnet=Subnet 2", "-o", "user=admin"]


def docker(host, *args, **kw):
    return host.docker(*args, **kw)


def links(host):
    out = host.run("ip", "-o", "link", "show").stdout
    return sorted(line.split(":")[1].strip().split("@")[0]
                  for line in out.splitlines() if line.strip())


def nuage_links(host):
    return [n for n in links(host) if n.startswith(("nuv", "nut"))]


def nuage_rows(vrs):
    return {"ports": vrs.select("Nuage_Port_Table"), "vms": vrs.select("Nuage_VM_Table")}


def ovs_ports(vrs):
    return [n for n in vrs.port_names() if n != vrs.bridge]


def assert_clean(host, vrs):
    assert nuage_rows(vrs) == {"ports": [], "vms": []}
    assert ovs_ports(vrs) == []
    assert [i["name"] for i in vrs.select("Interface", columns=["name"])] == [vrs.bridge]
    assert nuage_links(host) == []


def container_net(host, name, network):
    out = docker(host, "inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout
    return json.loads(out)[network]


def container_id(host, name):
    return docker(host, "inspect", "-f", "{{.Id}}", name).stdout.strip()


def wait_for(fn, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")


def test_mynet_two_containers_ping_through_alubr0(nuage_host, lab_vrs, fake_vrs, nuage_plugin):
    h = nuage_host
    docker(h, "network", "create", "--driver=nuage", *OPTS, "--subnet=10.21.59.0/24",
           "--gateway=10.21.59.1", "MyNet")
    try:
        info = json.loads(docker(h, "network", "inspect", "MyNet").stdout)[0]
        assert info["Driver"] == "nuage"
        assert info["Options"] == {"organization": "Enterprise", "domain": "Domain",
                                   "zone": "Zone", "subnet": "Subnet 2", "user": "admin"}
        assert info["IPAM"]["Config"][0]["Subnet"] == "10.21.59.0/24"

        docker(h, "run", "-d", "--net", "MyNet", "--name", "c1", "busybox", "sleep", "1d")
        docker(h, "run", "-d", "--net", "MyNet", "--name", "c2", "busybox", "sleep", "1d")
        n1, n2 = container_net(h, "c1", "MyNet"), container_net(h, "c2", "MyNet")
        ip1, ip2 = n1["IPAddress"], n2["IPAddress"]
        assert ip1.startswith("10.21.59.") and ip2.startswith("10.21.59.")

        # container side: Docker's address, VRS's gateway as default route
        addr = docker(h, "exec", "c1", "ip", "-4", "addr", "show", "eth0").stdout
        assert f"inet {ip1}/24" in addr
        assert "default via 10.21.59.1 dev eth0" in docker(h, "exec", "c1", "ip", "route").stdout
        mac1 = docker(h, "exec", "c1", "cat", "/sys/class/net/eth0/address").stdout.strip()
        assert mac1 == n1["MacAddress"]

        # through alubr0 (ovs-vswitchd, netdev datapath)
        docker(h, "exec", "c1", "ping", "-c2", "-W2", ip2)
        docker(h, "exec", "c2", "ping", "-c2", "-W2", ip1)

        # OVSDB: one vPort per container, with the metadata VRS needs
        rows = nuage_rows(lab_vrs)
        assert len(rows["ports"]) == 2 and len(rows["vms"]) == 2
        ports = ovs_ports(lab_vrs)
        assert len(ports) == 2
        for cname, net in (("c1", n1), ("c2", n2)):
            cid = container_id(h, cname)
            vm = next(v for v in rows["vms"] if v["vm_uuid"] == cid)
            assert vm["vm_name"] == cname
            assert (vm["type"], vm["domain"], vm["event"], vm["event_type"], vm["state"],
                    vm["reason"]) == (4, 4, 2, 0, 1, 1)
            assert vm["nuage_user"] == "admin" and vm["nuage_enterprise"] == "Enterprise"
            assert vm["metadata"] == {"user": "admin", "enterprise": "Enterprise"}
            assert len(vm["ports"]) == 1
            name = vm["ports"][0]
            assert re.fullmatch(r"nuv[0-9a-f]{12}", name)
            assert name == "nuv" + net["EndpointID"][:12]
            port = next(p for p in rows["ports"] if p["name"] == name)
            assert port["mac"] == net["MacAddress"]
            assert port["bridge"] == "alubr0" and port["vm_domain"] == 4
            assert (port["nuage_domain"], port["nuage_zone"], port["nuage_network"],
                    port["nuage_network_type"]) == ("Domain", "Zone", "Subnet 2", "ipv4")
            assert port["metadata"] == {
                "nuage-enterprise-domain": "Domain", "nuage-enterprise-zone": "Zone",
                "nuage-enterprise-network": "Subnet 2",
                "nuage-enterprise-network-type": "ipv4", "static-ip": net["IPAddress"]}
            # resolved by (fake) VRS
            assert (port["ip_addr"], port["subnet_mask"], port["gateway"]) == \
                (net["IPAddress"], "255.255.255.0", "10.21.59.1")
            assert port["vrf_id"] and port["evpn_id"]
            # the OVS port/interface on alubr0, attached by vswitchd
            assert name in ports
            itf = lab_vrs.select("Interface", [["name", "==", name]])[0]
            assert itf["external_ids"]["vm-uuid"] == cid
            assert itf["external_ids"]["vm-name"] == cname
            assert lab_vrs.ofport(name) > 0
            assert name in links(h)
    finally:
        docker(h, "rm", "-f", "c1", "c2", check=False)
        docker(h, "network", "rm", "MyNet", check=False)
    assert_clean(h, lab_vrs)
    assert "MyNet" not in docker(h, "network", "ls").stdout
    assert store_keys(h) == []


# ---------------------------------------------------------------------------
# helpers for the remaining tests

def store_keys(host, name="nuage"):
    """Every key the plugin instance ``name`` keeps (its embedded datastore file)."""
    from netplugin.datastore.embedded import EmbeddedDatastore
    ds = EmbeddedDatastore(f"{host.dir}/{name}-state.db")
    try:
        return [i.key for i in ds.list_prefix("/netplugin/nuage/v1")]
    finally:
        ds.close()


def make_net(host, name, subnet, vsd_subnet="Subnet 3", driver="nuage"):
    opts = [o if not o.startswith("subnet=") else f"subnet={vsd_subnet}" for o in OPTS]
    docker(host, "network", "create", f"--driver={driver}", *opts, f"--subnet={subnet}", name)


def test_bad_options_are_clear_errors_and_leave_nothing(nuage_host, nuage_plugin):
    h = nuage_host
    before = store_keys(h)
    base = ["network", "create", "--driver=nuage", "--subnet=10.21.70.0/24"]
    cases = [
        ([o for o in OPTS if o != "user=admin"][:-1], "missing nuage network option user"),
        (OPTS[:-1] + ["user="], "empty nuage network option user"),
        (OPTS[:-1] + ["user=  "], "empty nuage network option user"),
        (["-o", "organization=Enterprise"], "missing nuage network options domain, zone, "
                                            "subnet, user"),
        ([], "missing nuage network options organization, domain, zone, subnet, user"),
        (OPTS + ["-o", "colour=blue"], "unknown nuage network option 'colour'"),
    ]
    for opts, words in cases:
        r = docker(h, *base, *opts, "bad", check=False)
        assert r.returncode != 0, opts
        assert words in r.stderr, (opts, r.stderr)
    r = docker(h, "network", "create", "--driver=nuage", "--ipv6", *OPTS,
               "--subnet=10.21.70.0/24", "--subnet=fd00:70::/64", "bad", check=False)
    assert r.returncode != 0 and "IPv4 only" in r.stderr
    assert "bad" not in docker(h, "network", "ls", "--format", "{{.Name}}").stdout.split()
    assert store_keys(h) == before
    assert nuage_plugin.call("/Plugin.Activate") == (200, {"Implements": ["NetworkDriver"]})


def test_resolution_timeout_is_clear_and_leaves_nothing(nuage_host, lab_vrs, fake_vrs,
                                                         nuage_plugin):
    h = nuage_host
    make_net(h, "SilentNet", SILENT_SUBNET[1], vsd_subnet=SILENT_SUBNET[0])
    try:
        started = time.monotonic()
        r = docker(h, "run", "-d", "--net", "SilentNet", "--name", "silent", "busybox",
                   "sleep", "1d", check=False)
        elapsed = time.monotonic() - started
        assert r.returncode != 0
        assert "did not resolve vPort nuv" in r.stderr and "within 4s" in r.stderr, r.stderr
        assert elapsed < 30
        assert_clean(h, lab_vrs)
        assert [k for k in store_keys(h) if "/endpoint/" in k] == []
    finally:
        docker(h, "rm", "-f", "silent", check=False)
        docker(h, "network", "rm", "SilentNet", check=False)
    assert store_keys(h) == []


def test_unreachable_vrs_is_a_clear_error(nuage_host, lab_vrs, nuage_plugin):
    h = nuage_host
    proc = PluginProcess(h, nuage_config(h, f"unix:{lab_vrs.dir}/missing.sock",
                                         name="nuagedown"), name="nuagedown")
    proc.start()
    try:
        make_net(h, "DownNet", "10.21.71.0/24", driver="nuagedown")
        r = docker(h, "run", "-d", "--net", "DownNet", "--name", "down", "busybox",
                   "sleep", "1d", check=False)
        assert r.returncode != 0
        assert "missing.sock is not reachable" in r.stderr, r.stderr
        assert "No such file or directory" in r.stderr, r.stderr
        assert nuage_links(h) == []
        assert [k for k in store_keys(h, "nuagedown") if "/endpoint/" in k] == []
        assert proc.call("/Plugin.Activate")[0] == 200     # still serving
        docker(h, "rm", "-f", "down", check=False)
        docker(h, "network", "rm", "DownNet")
        assert store_keys(h, "nuagedown") == []
    finally:
        docker(h, "rm", "-f", "down", check=False)
        docker(h, "network", "rm", "DownNet", check=False)
        proc.stop()
    assert_clean(h, lab_vrs)


def test_seed_config_over_tcp(nuage_host, lab_vrs, fake_vrs, nuage_plugin):
    """The seed's flat keys, VRS reached over TCP (VrsEndpoint localhost:6633)."""
    h = nuage_host
    config = f'''
VrsEndpoint = "localhost"
VrsPort = 6633
VrsBridge = "alubr0"
DockerEndpoint = "{h.docker_host}"
LogLevel = "Info"
Scope = "local"
socket = "/run/docker/plugins/nuagetcp.sock"
state_dir = "{h.dir}/run"
[datastore]
path = "{h.dir}/nuagetcp-state.db"
[nuage]
hostname = "{h.name}"
resolve_timeout = 4.0
'''
    proc = PluginProcess(h, config, name="nuagetcp")
    proc.start()
    try:
        make_net(h, "TcpNet", "10.21.60.0/24", driver="nuagetcp")
        docker(h, "run", "-d", "--net", "TcpNet", "--name", "t1", "busybox", "sleep", "1d")
        net = container_net(h, "t1", "TcpNet")
        name = "nuv" + net["EndpointID"][:12]
        port = lab_vrs.select("Nuage_Port_Table", [["name", "==", name]])[0]
        assert port["ip_addr"] == net["IPAddress"] and port["nuage_network"] == "Subnet 3"
        vm = lab_vrs.select("Nuage_VM_Table")[0]
        assert (vm["vm_uuid"], vm["vm_name"]) == (container_id(h, "t1"), "t1")
        itf = lab_vrs.select("Interface", [["name", "==", name]])[0]
        assert itf["external_ids"]["netplugin-driver"] == "nuagetcp"
        assert "ok in" in proc.log() and "tcp:127.0.0.1:6633" in proc.log()
    finally:
        docker(h, "rm", "-f", "t1", check=False)
        docker(h, "network", "rm", "TcpNet", check=False)
        proc.stop()
    assert_clean(h, lab_vrs)


def test_second_network_on_a_running_container(nuage_host, lab_vrs, fake_vrs, nuage_plugin):
    """One VM row per container: docker network connect adds a vPort to it."""
    h = nuage_host
    make_net(h, "NetA", "10.21.59.0/24", vsd_subnet="Subnet 2")
    make_net(h, "NetB", "10.21.60.0/24", vsd_subnet="Subnet 3")
    try:
        docker(h, "run", "-d", "--net", "NetA", "--name", "multi", "busybox", "sleep", "1d")
        docker(h, "network", "connect", "NetB", "multi")
        a, b = container_net(h, "multi", "NetA"), container_net(h, "multi", "NetB")
        names = sorted("nuv" + n["EndpointID"][:12] for n in (a, b))
        vms = lab_vrs.select("Nuage_VM_Table")
        assert len(vms) == 1 and sorted(vms[0]["ports"]) == names
        assert vms[0]["vm_uuid"] == container_id(h, "multi")
        assert sorted(ovs_ports(lab_vrs)) == names
        assert "eth1" in docker(h, "exec", "multi", "ip", "-o", "link").stdout
        docker(h, "network", "disconnect", "NetB", "multi")
        vms = lab_vrs.select("Nuage_VM_Table")
        assert vms[0]["ports"] == ["nuv" + a["EndpointID"][:12]]
        assert ovs_ports(lab_vrs) == vms[0]["ports"]
    finally:
        docker(h, "rm", "-f", "multi", check=False)
        docker(h, "network", "rm", "NetA", "NetB", check=False)
    assert_clean(h, lab_vrs)


def _ping(host, src, dst_ip, timeout=30.0):
    """Ping until it answers (vswitchd re-attaches ports after a reconnect)."""
    deadline = time.monotonic() + timeout
    while True:
        r = docker(host, "exec", src, "ping", "-c1", "-W1", dst_ip, check=False)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{src} cannot ping {dst_ip}: {r.stdout}{r.stderr}")


def test_reconnect_reasserts_rows_after_ovsdb_restart(nuage_host, lab_vrs, fake_vrs,
                                                      nuage_plugin):
    h = nuage_host
    make_net(h, "ReNet", "10.21.60.0/24")
    try:
        docker(h, "run", "-d", "--net", "ReNet", "--name", "r1", "busybox", "sleep", "1d")
        docker(h, "run", "-d", "--net", "ReNet", "--name", "r2", "busybox", "sleep", "1d")
        ip2 = container_net(h, "r2", "ReNet")["IPAddress"]
        _ping(h, "r1", ip2)
        before_ports = nuage_rows(lab_vrs)["ports"]
        before_vms = nuage_rows(lab_vrs)["vms"]
        names = sorted(p["name"] for p in before_ports)
        uuids = [p["_uuid"] for p in lab_vrs.select("Port", columns=["_uuid", "name"])
                 if p["name"] in names]

        # VRS restarts and comes back without our rows (they were lost)
        lab_vrs.stop_ovsdb()
        r = docker(h, "run", "-d", "--net", "ReNet", "--name", "r3", "busybox", "sleep",
                   "1d", check=False)
        assert r.returncode != 0 and "is not reachable" in r.stderr, r.stderr
        docker(h, "rm", "-f", "r3", check=False)
        ops = [{"op": "delete", "table": "Nuage_Port_Table", "where": []},
               {"op": "delete", "table": "Nuage_VM_Table", "where": []},
               {"op": "mutate", "table": "Bridge", "where": [["name", "==", "alubr0"]],
                "mutations": [["ports", "delete", ["set", [["uuid", u] for u in uuids]]]]}]
        h.run("ovsdb-tool", "transact", lab_vrs.db_path,
              json.dumps(["Open_vSwitch"] + ops))
        lab_vrs.start_ovsdb()

        # the plugin reconnects and re-asserts; (fake) VRS resolves again
        def back():
            ports = nuage_rows(lab_vrs)["ports"]
            return (sorted(p["name"] for p in ports) == names
                    and all(p["ip_addr"] for p in ports)
                    and sorted(ovs_ports(lab_vrs)) == names)
        wait_for(back, 20, "re-asserted vPorts")
        after = nuage_rows(lab_vrs)
        strip = lambda rows, drop: sorted(  # noqa: E731
            ({k: v for k, v in r.items() if k not in drop} for r in rows),
            key=lambda r: json.dumps(r, sort_keys=True))
        assert strip(after["ports"], {"_uuid", "_version"}) == \
            strip(before_ports, {"_uuid", "_version"})
        assert strip(after["vms"], {"_uuid", "_version"}) == \
            strip(before_vms, {"_uuid", "_version"})
        _ping(h, "r1", ip2)
        assert "VRS connection #2" in nuage_plugin.log()
        assert [n for n in nuage_links(h) if "nuv" in n] == names
    finally:
        docker(h, "rm", "-f", "r1", "r2", "r3", check=False)
        docker(h, "network", "rm", "ReNet", check=False)
    assert_clean(h, lab_vrs)


def test_restart_keeps_networks_and_audit_removes_what_docker_forgot(
        nuage_host, lab_vrs, fake_vrs, nuage_plugin):
    h = nuage_host
    make_net(h, "AuNet", "10.21.60.0/24")
    try:
        docker(h, "run", "-d", "--net", "AuNet", "--name", "a1", "busybox", "sleep", "1d")
        nid = json.loads(docker(h, "network", "inspect", "AuNet").stdout)[0]["Id"]
        live = "nuv" + container_net(h, "a1", "AuNet")["EndpointID"][:12]
        # An endpoint Docker never had / forgot (e.g. removed while the plugin was
        # down): plugged through the plugin's own socket.
        stale = "dead" + "0" * 60
        status, body = nuage_plugin.call("/NetworkDriver.CreateEndpoint", {
            "NetworkID": nid, "EndpointID": stale,
            "Interface": {"Address": "10.21.60.200/24", "AddressIPv6": "", "MacAddress": ""}})
        assert status == 200, body
        status, body = nuage_plugin.call("/NetworkDriver.Join", {
            "NetworkID": nid, "EndpointID": stale, "SandboxKey": "/nonexistent"})
        assert status == 200 and body["Gateway"] == "10.21.60.1", body
        stale_port = "nuvdead00000000"
        assert stale_port in ovs_ports(lab_vrs) and stale_port in links(h)
        vm = [v for v in lab_vrs.select("Nuage_VM_Table") if v["vm_uuid"] == stale]
        assert vm and vm[0]["vm_name"] == stale[:12]     # Docker could not name it

        # ./plugin --audit --dry-run reports it and touches nothing
        out = h.run(LAUNCHER, "--audit", "--dry-run", "-f", nuage_plugin.config_path).stdout
        summary = json.loads(out)
        assert summary["dry_run"] is True and summary["vrs"] == "connected"
        assert summary["stale_endpoints"] == [stale]
        assert summary["orphan_vports"] == [stale_port]
        assert stale_port in ovs_ports(lab_vrs) and stale_port in links(h)

        nuage_plugin.stop()
        nuage_plugin.start()

        def audited():
            return stale_port not in ovs_ports(lab_vrs) and stale_port not in links(h)
        wait_for(audited, 20, "the start-up audit (two looks [nuage] audit_grace apart)")
        names = [p["name"] for p in lab_vrs.select("Nuage_Port_Table")]
        assert names == [live]
        assert [v["vm_name"] for v in lab_vrs.select("Nuage_VM_Table")] == ["a1"]
        assert not [k for k in store_keys(h) if k.endswith(stale)]
        assert "audit: endpoint dead00000000" in nuage_plugin.log()

        # the network survived the restart: a new container still gets plugged
        docker(h, "run", "-d", "--net", "AuNet", "--name", "a2", "busybox", "sleep", "1d")
        _ping(h, "a2", container_net(h, "a1", "AuNet")["IPAddress"])
    finally:
        docker(h, "rm", "-f", "a1", "a2", check=False)
        docker(h, "network", "rm", "AuNet", check=False)
    assert_clean(h, lab_vrs)
    assert store_keys(h) == []


_ETCD_DUMP = ("import json, sys\n"
              "from netplugin.config import DatastoreConfig\n"
              "from netplugin.datastore import open_datastore\n"
              "s = open_datastore(DatastoreConfig(type='etcd', endpoints=[sys.argv[1]]))\n"
              "print(json.dumps([i.key for i in s.list_prefix(sys.argv[2])]))\n")


def test_global_scope_networks_are_known_on_every_host(nuage_host, lab_vrs, fake_vrs,
                                                       etcd_url):
    """Two plugin instances (host names nu and nu2) sharing etcd: a network created
    through one is usable through the other, as with scope global."""
    import sys
    h = nuage_host

    def etcd_keys():
        out = h.run(sys.executable, "-c", _ETCD_DUMP, etcd_url, "/netplugin/nuage").stdout
        return json.loads(out)

    config = '''
scope = "global"
backend = "nuage"
socket = "/run/docker/plugins/{name}.sock"
state_dir = "{state_dir}"
[datastore]
type = "etcd"
endpoints = ["{etcd}"]
timeout = 3.0
[nuage]
vrs_endpoint = "unix:{sock}"
docker_endpoint = "{docker}"
hostname = "{hostname}"
resolve_timeout = 4.0
'''
    procs = []
    for name, hostname in (("nuageg1", "nu"), ("nuageg2", "nu2")):
        procs.append(PluginProcess(h, config.format(name=name, etcd=etcd_url,
                                                    sock=lab_vrs.sock, docker=h.docker_host,
                                                    hostname=hostname,
                                                    state_dir=os.path.join(h.dir, "run")),
                                      name=name).start())
    g1, g2 = procs
    nid, eid = "6e" * 32, "e6" * 32
    try:
        assert g1.call("/NetworkDriver.GetCapabilities")[1]["Scope"] == "global"
        status, body = g1.call("/NetworkDriver.CreateNetwork", {
            "NetworkID": nid, "Options": {"com.docker.network.generic": {
                "organization": "Enterprise", "domain": "Domain", "zone": "Zone",
                "subnet": "Subnet 3", "user": "admin"}},
            "IPv4Data": [{"AddressSpace": "GlobalDefault", "Pool": "10.21.60.0/24",
                          "Gateway": "10.21.60.1/24"}]})
        assert status == 200, body
        status, body = g2.call("/NetworkDriver.CreateEndpoint", {
            "NetworkID": nid, "EndpointID": eid,
            "Interface": {"Address": "10.21.60.50/24", "AddressIPv6": "", "MacAddress": ""}})
        assert status == 200 and body["Interface"]["MacAddress"].startswith("7a:42:"), body
        status, body = g2.call("/NetworkDriver.Join", {
            "NetworkID": nid, "EndpointID": eid, "SandboxKey": "/nonexistent"})
        assert status == 200 and body["Gateway"] == "10.21.60.1", body
        assert "nuv" + eid[:12] in ovs_ports(lab_vrs)
        assert f"/netplugin/nuage/v1/host/nu2/endpoint/{eid}" in etcd_keys()
        status, body = g2.call("/NetworkDriver.CreateEndpoint", {
            "NetworkID": "ab" * 32, "EndpointID": "cd" * 32,
            "Interface": {"Address": "10.21.60.51/24"}})
        assert status == 500 and "not known to the nuage plugin" in body["Err"]
        assert g2.call("/NetworkDriver.Leave", {"NetworkID": nid, "EndpointID": eid})[0] == 200
        assert g2.call("/NetworkDriver.DeleteEndpoint",
                       {"NetworkID": nid, "EndpointID": eid})[0] == 200
        assert g1.call("/NetworkDriver.DeleteNetwork", {"NetworkID": nid})[0] == 200
        assert etcd_keys() == []
    finally:
        for proc in procs:
            proc.stop()
    assert_clean(h, lab_vrs)
