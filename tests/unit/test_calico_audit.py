"""The Calico leak audit (backends/calico/audit.py) against the real embedded
datastore.  Docker's view is fed as data through the ``docker_view`` seam
(plus a stub Docker API on a unix socket for the SDK path); host devices are
fakes in-process and real veths inside throwaway network namespaces."""
import glob
import http.server
import ipaddress
import json
import os
import socketserver
import threading
import time

import pytest

import backends.calico.driver  # noqa: F401  (registers "calico")
from backends.calico import audit as audit_mod
from backends.calico import model as keys
from backends.calico.audit import (Device, DockerUnavailable, DockerView, auditor_for,
                                   fetch_docker_view, parse_docker_view)
from netplugin import cli
from netplugin import protocol as p
from tests.netns_runner import calico_backend, netns_unavailable_reason, run_in_netns

HOST = "host-a"
POOL = "10.77.0.0/16"
NID_C = "c" * 64          # Calico IPAM network
NID_D = "d" * 64          # Docker IPAM network (--subnet 192.168.50.0/24)
NID_X = "e" * 64          # another driver's network
EID1 = "1a" * 32
EID2 = "2b" * 32
EID3 = "3c" * 32
EID4 = "4d" * 32


def cali(eid):
    return "cali" + eid[:11]


def tmp(eid):
    return "tmp" + eid[:11]


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(autouse=True)
def no_real_netlink(monkeypatch):
    """In-process tests never list or delete the machine's own links."""
    def refuse(*_a, **_k):
        raise AssertionError("in-process test touched real netlink")
    monkeypatch.setattr(audit_mod, "list_devices", refuse)
    monkeypatch.setattr(audit_mod, "delete_device", refuse)


class Env:
    def __init__(self, tmp_path):
        self.backend, self.store = calico_backend(str(tmp_path / "state.db"), hostname=HOST)
        self.backend.config.calico.docker_endpoint = f"unix://{tmp_path}/no-docker.sock"
        self.backend.config.calico.docker_timeout = 1.0
        self.inner = self.store.inner
        self.devices = []           # [Device]
        self.deleted = []
        self.views = []             # DockerView per call (last one repeats)
        self.calls = 0
        self.hooks = {}             # call number -> callable run before answering
        self.inner.put(f"/calico/v1/ipam/v4/pool/{POOL.replace('/', '-')}",
                       json.dumps({"cidr": POOL}))
        self.create_network(NID_C, calico_ipam=True)
        self.create_network(NID_D, calico_ipam=False)

    # Docker's calls, as dockerd makes them --------------------------------
    def create_network(self, nid, calico_ipam):
        if calico_ipam:
            data = [{"AddressSpace": "CalicoLocalAddressSpace", "Pool": "0.0.0.0/0",
                     "Gateway": "0.0.0.0/0", "AuxAddresses": {}}]
        else:
            data = [{"AddressSpace": "LocalDefault", "Pool": "192.168.50.0/24",
                     "Gateway": "192.168.50.1/24", "AuxAddresses": {}}]
        self.backend.create_network(p.CreateNetworkRequest.parse({
            "NetworkID": nid, "Options": {"com.docker.network.generic": {}},
            "IPv4Data": data, "IPv6Data": []}))

    def request_address(self, address=""):
        resp = self.backend.request_address(p.RequestAddressRequest.parse(
            {"PoolID": "CalicoPoolIPv4", "Address": address, "Options": {}}))
        return resp.address

    def create_endpoint(self, nid, eid, address):
        self.backend.create_endpoint(p.CreateEndpointRequest.parse({
            "NetworkID": nid, "EndpointID": eid,
            "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": ""},
            "Options": {}}))

    def container(self, nid, eid, calico_ipam=True, address="192.168.50.2/24",
                  device=True):
        """RequestAddress (Calico IPAM) + CreateEndpoint (+ the veth of Join)."""
        if calico_ipam:
            address = self.request_address()
        self.create_endpoint(nid, eid, address)
        if device:
            self.add_device(eid)
        return str(ipaddress.ip_interface(address).ip)

    def add_device(self, eid, with_temp=False, marked=True):
        n = len(self.devices)
        self.devices.append(Device(cali(eid), "veth", 100 + n, 200 + n,
                                   peer_elsewhere=not with_temp,
                                   alias=keys.veth_marker(eid) if marked else None))
        if with_temp:
            self.devices.append(Device(tmp(eid), "veth", 200 + n, 100 + n))

    # state ------------------------------------------------------------------
    def endpoint_ids(self, host=HOST):
        return sorted(i.key.rsplit("/", 1)[1]
                      for i in self.inner.list_prefix(keys.endpoint_dir(host)))

    def allocated(self):
        out = set()
        for item in self.inner.list_prefix("/calico/ipam/v2/assignment/"):
            block = json.loads(item.value)
            net = ipaddress.ip_network(block["cidr"])
            out |= {str(net.network_address + o)
                    for o, a in enumerate(block["allocations"]) if a is not None}
        return out

    # seams --------------------------------------------------------------------
    def view(self, endpoints=(), networks=(NID_C, NID_D), addresses=()):
        return DockerView(frozenset(endpoints), frozenset(networks),
                          frozenset(ipaddress.ip_address(a) for a in addresses), 2)

    def docker_view(self):
        self.calls += 1
        if self.calls in self.hooks:
            self.hooks[self.calls]()
        view = self.views[min(self.calls, len(self.views)) - 1]
        if isinstance(view, Exception):
            raise view
        return view

    def list_devices(self):
        return list(self.devices)

    def delete_device(self, name):
        found = [d for d in self.devices if d.name == name]
        if not found:
            return False
        self.deleted.append(name)
        peer = [d for d in self.devices if d.index == found[0].peer_index]
        self.devices = [d for d in self.devices if d not in found + peer]
        return True

    def audit(self, dry_run=False, grace=0.0, **kw):
        return auditor_for(self.backend, docker_view=self.docker_view, devices=self.list_devices,
                       delete_device=self.delete_device, grace=grace, **kw).run(dry_run)


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.store.close()


def removed(summary):
    return (summary["endpoints_removed"], summary["devices_removed"],
            summary["addresses_released"])


# --------------------------------------------------------------------------
# the leaks it removes, what it keeps


def test_forgotten_endpoints_are_removed_and_running_ones_kept(env):
    ip1 = env.container(NID_C, EID1)                      # running, Docker knows it
    ip2 = env.container(NID_C, EID2)                      # forgotten by Docker
    ip3 = env.container(NID_D, EID3, calico_ipam=False)   # forgotten, Docker IPAM
    ip4 = env.container(NID_D, EID4, calico_ipam=False, address="192.168.50.9/24")
    env.backend.gateways.choose("/var/run/docker/netns/x", EID2, alive=lambda e: True)
    env.views = [env.view(endpoints=[EID1, EID4], addresses=[ip1, ip4])]

    summary = env.audit()

    assert summary["docker"] == "ok"
    assert summary["endpoints_removed"] == sorted([EID2, EID3])
    assert summary["devices_removed"] == sorted([cali(EID2), cali(EID3)])
    assert summary["addresses_released"] == [ip2]
    assert summary["kept"] == 2 and summary["errors"] == []
    assert env.endpoint_ids() == sorted([EID1, EID4])
    assert env.allocated() == {ip1}
    assert sorted(d.name for d in env.devices) == sorted([cali(EID1), cali(EID4)])
    assert ip3 not in env.allocated()
    assert not glob.glob(os.path.join(env.backend.gateways.root, "*", EID2))
    assert env.calls == 2     # two looks

    # a second run finds nothing and does not wait for a second look
    env.calls = 0
    assert removed(env.audit(grace=30)) == ([], [], [])
    assert env.calls == 1


def test_nothing_leaked_means_one_look_and_no_wait(env):
    ip1 = env.container(NID_C, EID1)
    env.views = [env.view(endpoints=[EID1], addresses=[ip1])]
    started = time.monotonic()
    summary = env.audit(grace=30)
    assert time.monotonic() - started < 5
    assert removed(summary) == ([], [], []) and summary["kept"] == 1
    assert env.calls == 1


def test_grace_period_separates_the_two_looks(env):
    env.container(NID_C, EID2)
    env.views = [env.view()]
    stamps = []
    env.hooks = {1: lambda: stamps.append(time.monotonic()),
                 2: lambda: stamps.append(time.monotonic())}
    summary = env.audit(grace=0.5)
    assert summary["endpoints_removed"] == [EID2]
    assert stamps[1] - stamps[0] >= 0.5


def test_stop_during_grace_removes_nothing(env):
    env.container(NID_C, EID2)
    env.views = [env.view()]
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    summary = env.audit(grace=30, stop=stop)
    assert removed(summary) == ([], [], [])
    assert "interrupted" in " ".join(summary["skipped"])
    assert env.endpoint_ids() == [EID2]


def test_docker_unreachable_changes_nothing(env):
    env.container(NID_C, EID2)
    env.request_address()                                 # an orphan allocation too
    before = (env.endpoint_ids(), env.allocated(), list(env.devices))
    env.views = [DockerUnavailable("connection refused")]
    summary = env.audit()
    assert summary["docker"] == "unreachable: connection refused"
    assert removed(summary) == ([], [], [])
    assert (env.endpoint_ids(), env.allocated(), list(env.devices)) == before


def test_docker_unreachable_at_second_look_changes_nothing(env):
    env.container(NID_C, EID2)
    before = (env.endpoint_ids(), env.allocated())
    env.views = [env.view(), DockerUnavailable("timed out")]
    summary = env.audit()
    assert summary["docker"].startswith("unreachable: timed out")
    assert removed(summary) == ([], [], [])
    assert (env.endpoint_ids(), env.allocated()) == before
    assert env.deleted == []


def test_real_docker_client_on_a_dead_socket_is_unreachable(env):
    env.container(NID_C, EID2)
    summary = auditor_for(env.backend, devices=env.list_devices,
                      delete_device=env.delete_device, grace=0).run()
    assert summary["docker"].startswith("unreachable: ")
    assert "no-docker.sock" in summary["docker"]
    assert env.endpoint_ids() == [EID2]


# --------------------------------------------------------------------------
# in-flight work is not a leak


def test_allocation_in_flight_is_kept(env):
    """RequestAddress done, CreateEndpoint not yet: unreferenced at the first
    look; the endpoint exists and Docker knows it at the second."""
    ip = env.request_address().split("/")[0]
    env.views = [env.view(), env.view(endpoints=[EID1], addresses=[ip])]
    env.hooks = {1: lambda: env.create_endpoint(NID_C, EID1, ip + "/32")}
    summary = env.audit()
    assert removed(summary) == ([], [], [])
    assert env.allocated() == {ip} and env.endpoint_ids() == [EID1]


def test_endpoint_docker_has_not_stored_yet_is_kept(env):
    """CreateEndpoint answered, dockerd has not stored the endpoint yet."""
    ip = env.container(NID_C, EID1, device=False)
    env.views = [env.view(), env.view(endpoints=[EID1], addresses=[ip])]
    summary = env.audit()
    assert removed(summary) == ([], [], [])
    assert env.endpoint_ids() == [EID1] and env.allocated() == {ip}


def test_record_appearing_between_looks_keeps_its_address(env):
    """An allocation orphaned at the first look whose endpoint record appears
    before the second one (Docker not told yet) keeps its address, and the
    record (not a candidate of the first look) stays."""
    ip = env.request_address().split("/")[0]
    env.views = [env.view()]
    env.hooks = {1: lambda: env.create_endpoint(NID_C, EID1, ip + "/32")}
    summary = env.audit()
    assert removed(summary) == ([], [], [])
    assert env.allocated() == {ip} and env.endpoint_ids() == [EID1]


def test_truly_orphan_allocation_is_released(env):
    ip_used = env.container(NID_C, EID1)
    orphan = env.request_address().split("/")[0]
    env.views = [env.view(endpoints=[EID1], addresses=[ip_used])]
    summary = env.audit()
    assert summary["addresses_released"] == [orphan]
    assert summary["endpoints_removed"] == [] and env.allocated() == {ip_used}


def test_record_changed_during_the_audit_is_kept_with_its_address(env):
    ip = env.container(NID_C, EID2, device=False)
    env.views = [env.view()]
    key = keys.endpoint(HOST, EID2)

    def touch():   # after the second look read the datastore
        env.inner.put(key, env.inner.get(key).value)
    env.hooks = {2: touch}
    summary = env.audit()
    assert summary["endpoints_removed"] == [] and summary["addresses_released"] == []
    assert "changed" in summary["errors"][0]
    assert env.endpoint_ids() == [EID2] and env.allocated() == {ip}


# --------------------------------------------------------------------------
# safety rules


def test_endpoint_of_a_network_docker_does_not_know_is_kept(env):
    """Our network record exists but Docker does not list the network: the
    wrong dockerd (or its state lost): keep and say so."""
    ip = env.container(NID_C, EID2)
    env.views = [env.view(networks=[NID_D])]
    summary = env.audit()
    assert removed(summary) == ([], [], [])
    assert any(EID2 in s and "docker_endpoint" in s for s in summary["skipped"])
    assert env.endpoint_ids() == [EID2] and env.allocated() == {ip}
    assert [d.name for d in env.devices] == [cali(EID2)]


def test_endpoint_of_a_deleted_network_is_removed(env):
    """`docker network rm` after Docker forgot the endpoint: DeleteNetwork
    removed our network record; the endpoint and its address are leaks."""
    ip = env.container(NID_C, EID2)
    env.backend.delete_network(p.NetworkRequest.parse({"NetworkID": NID_C}))
    env.views = [env.view(networks=[NID_D])]
    summary = env.audit()
    assert summary["endpoints_removed"] == [EID2]
    assert summary["addresses_released"] == [ip]


def test_corrupt_records_are_kept_and_block_address_release(env):
    env.container(NID_C, EID2)
    orphan = env.request_address().split("/")[0]
    env.inner.put(keys.endpoint(HOST, EID3), "{not json")
    env.views = [env.view()]
    summary = env.audit()
    assert summary["endpoints_removed"] == [EID2]
    assert summary["addresses_released"] == []
    assert any("corrupt" in s for s in summary["skipped"])
    assert EID3 in env.endpoint_ids() and orphan in env.allocated()


def test_other_hosts_and_other_orchestrators_are_not_touched(env):
    ip1 = env.container(NID_C, EID1, device=False)
    # another host's endpoint borrowing an address of our block, and its own leak
    borrowed = env.request_address().split("/")[0]
    env.inner.put(keys.endpoint("host-b", EID3), json.dumps(
        {"state": "active", "name": cali(EID3), "mac": "ee:ee:ee:ee:ee:ee",
         "profile_ids": [NID_C], "ipv4_nets": [borrowed + "/32"], "ipv6_nets": []}))
    # a Kubernetes pod on this host, its cali device, its address
    pod_ip = env.request_address().split("/")[0]
    env.inner.put(f"/calico/v1/host/{HOST}/workload/k8s/default.pod/endpoint/eth0",
                  json.dumps({"state": "active", "name": "cali0123456789a",
                              "mac": "ee:ee:ee:ee:ee:ee", "profile_ids": ["k8s"],
                              "ipv4_nets": [pod_ip + "/32"], "ipv6_nets": []}))
    env.devices.append(Device("cali0123456789a", "veth", 7, 8, True))
    # the IPIP tunnel address of this host (no handle, no endpoint)
    tunnel = env.request_address().split("/")[0]
    env.inner.put(f"/calico/v1/host/{HOST}/config/IpInIpTunnelAddr", tunnel)
    # an allocation with a handle (another Calico client)
    from backends.calico.ipam import CalicoIpam
    handled = str(CalicoIpam(env.inner).auto_assign_one(4, HOST, handle_id="k8s-pod-1"))
    # an address Docker knows (e.g. a container of another driver's network)
    docker_known = env.request_address().split("/")[0]
    # devices that are not ours
    env.devices += [Device("caliXYZ", "veth", 9, 10, True),
                    Device("cali0123456789b", "dummy", 11, None, False),
                    Device("tmp0123456789c", "veth", 12, 13, True)]
    env.views = [env.view(endpoints=[], networks=[NID_C, NID_D, NID_X],
                          addresses=[docker_known])]

    summary = env.audit()

    assert summary["endpoints_removed"] == [EID1]
    assert summary["addresses_released"] == [ip1]
    assert summary["devices_removed"] == []
    assert env.endpoint_ids("host-b") == [EID3]
    assert {borrowed, pod_ip, tunnel, handled, docker_known} <= env.allocated()
    assert len(env.devices) == 4


def test_docker_ipam_address_in_another_hosts_block_is_not_released(env):
    """A Docker-IPAM endpoint whose address happens to be allocated in another
    host's Calico block: not ours to release."""
    from backends.calico.ipam import CalicoIpam
    other = str(CalicoIpam(env.inner).auto_assign_one(4, "host-b"))
    # CreateEndpoint refuses an address outside the subnet now: plant the
    # record an older plugin could have written.
    env.create_endpoint(NID_D, EID3, "192.168.50.9/24")
    key = f"/calico/v1/host/host-a/workload/libnetwork/libnetwork/endpoint/{EID3}"
    value = json.loads(env.inner.get(key).value)
    env.inner.put(key, json.dumps(dict(value, ipv4_nets=[other + "/32"])))
    env.views = [env.view()]
    summary = env.audit()
    assert summary["endpoints_removed"] == [EID3]
    assert summary["addresses_released"] == []
    assert other in env.allocated()


def test_calico_ipam_address_in_another_hosts_block_is_released_with_its_endpoint(env):
    """docker run --ip X can land in another host's block: released with the
    forgotten endpoint, the rest of that block untouched."""
    from backends.calico.ipam import CalicoIpam
    ipam = CalicoIpam(env.inner)
    theirs = str(ipam.auto_assign_one(4, "host-b"))
    block = ipaddress.ip_network(theirs + "/26", strict=False)
    mine = str(block.network_address + 10)
    env.request_address(mine)
    env.create_endpoint(NID_C, EID2, mine + "/32")
    env.views = [env.view()]
    summary = env.audit()
    assert summary["endpoints_removed"] == [EID2]
    assert summary["addresses_released"] == [mine]
    assert theirs in env.allocated()


def test_devices(env):
    env.container(NID_C, EID1)                  # Docker knows it: kept
    env.add_device(EID2, with_temp=True)        # Join half-done, no record: leak
    env.container(NID_C, EID3)                  # forgotten: record + device
    env.views = [env.view(endpoints=[EID1])]
    summary = env.audit()
    assert summary["devices_removed"] == sorted([cali(EID2), tmp(EID2), cali(EID3)])
    assert [d.name for d in env.devices] == [cali(EID1)]


def test_dry_run_reports_and_changes_nothing(env):
    ip1 = env.container(NID_C, EID1)
    ip2 = env.container(NID_C, EID2)
    env.views = [env.view(endpoints=[EID1], addresses=[ip1])]
    before = (env.endpoint_ids(), env.allocated(), list(env.devices))
    summary = env.audit(dry_run=True)
    assert summary["dry_run"] is True
    assert removed(summary) == ([EID2], [cali(EID2)], [ip2])
    assert (env.endpoint_ids(), env.allocated(), list(env.devices)) == before


def test_ipv6_addresses(env):
    env.inner.put("/calico/v1/ipam/v6/pool/fd80:1::-64", json.dumps({"cidr": "fd80:1::/64"}))
    resp = env.backend.request_address(p.RequestAddressRequest.parse(
        {"PoolID": "CalicoPoolIPv6", "Address": "", "Options": {}}))
    ip6 = resp.address.split("/")[0]
    env.backend.create_endpoint(p.CreateEndpointRequest.parse({
        "NetworkID": NID_C, "EndpointID": EID2,
        "Interface": {"Address": "", "AddressIPv6": resp.address, "MacAddress": ""},
        "Options": {}}))
    env.views = [env.view()]
    summary = env.audit()
    assert summary["endpoints_removed"] == [EID2]
    assert summary["addresses_released"] == [ip6]


# --------------------------------------------------------------------------
# Docker's answers


def net(nid, driver="calico", containers=None, gateway="", aux=None):
    return {"Id": nid, "Name": nid[:4], "Driver": driver,
            "IPAM": {"Config": [{"Subnet": "10.0.0.0/24", "Gateway": gateway,
                                 "AuxiliaryAddresses": aux}]},
            "Containers": containers}


def test_parse_docker_view():
    nets = [net(NID_C, containers={
                "abc": {"EndpointID": EID1, "IPv4Address": "10.77.0.1/32", "IPv6Address": ""},
                "ep-" + EID2: {"EndpointID": EID2, "IPv4Address": "", "IPv6Address":
                               "fd80::5/128"}}, gateway="0.0.0.0/0"),
            net(NID_X, driver="bridge", containers=None, gateway="172.17.0.1",
                aux={"r": "172.17.0.9"})]
    containers = [{"Id": "x", "NetworkSettings": {"Networks": {
        "n": {"EndpointID": EID3, "IPAddress": "10.9.9.9", "GlobalIPv6Address": ""},
        "stopped": {"EndpointID": "", "IPAddress": "", "GlobalIPv6Address": ""}}}}]
    view = parse_docker_view(nets, containers, "calico")
    assert view.endpoints == {EID1, EID2, EID3}
    assert view.networks == {NID_C, NID_X}
    assert {str(a) for a in view.addresses} == {"10.77.0.1", "fd80::5", "0.0.0.0",
                                                "172.17.0.1", "172.17.0.9", "10.9.9.9"}
    assert view.our_networks == 1


@pytest.mark.parametrize("nets, containers", [
    ({"message": "nope"}, []),
    ([{"Name": "no id"}], []),
    ([net(NID_C, containers=["x"])], []),
    ([net(NID_C, containers={"a": "x"})], []),
    ([net(NID_C, containers={"a": {"IPv4Address": "10.0.0.1/32"}})], []),
    ([net(NID_C, containers={"a": {"EndpointID": EID1, "IPv4Address": "banana"}})], []),
    ([net(NID_C, gateway=17)], []),
    ([], [{"NetworkSettings": {"Networks": {"n": {"EndpointID": 5}}}}]),
    ([], "containers"),
])
def test_garbage_from_docker_is_unavailable(nets, containers):
    with pytest.raises(DockerUnavailable):
        parse_docker_view(nets, containers, "calico")


class _DockerStub(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def docker_stub(path, routes):
    """A Docker API on a unix socket: ``routes`` maps GET paths (without the
    /v1.41 prefix and query) to (status, JSON-able body or raw bytes); it
    answers ``/version`` (API 1.41) for the client's version negotiation."""
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            route = self.path.split("?")[0]
            if route.startswith("/v1.41"):
                route = route[len("/v1.41"):]
            default = ((200, {"ApiVersion": "1.41", "Version": "20.10.0"})
                       if route == "/version" else (404, {"message": "not found"}))
            status, body = routes.get(route, default)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = _DockerStub(path, Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_fetch_docker_view_through_the_sdk(tmp_path):
    sock = str(tmp_path / "docker.sock")
    routes = {
        "/networks": (200, [{"Id": NID_C, "Driver": "calico"}, {"Id": NID_X},
                            {"Id": NID_D}]),
        f"/networks/{NID_C}": (200, net(NID_C, containers={
            "k": {"EndpointID": EID1, "IPv4Address": "10.77.0.1/32"}})),
        f"/networks/{NID_X}": (200, net(NID_X, driver="bridge", gateway="172.17.0.1")),
        # NID_D: removed between list and inspect -> 404, ignored
        "/containers/json": (200, []),
    }
    srv = docker_stub(sock, routes)
    try:
        view = fetch_docker_view("unix://" + sock, 2.0, "calico")
        assert view.endpoints == {EID1} and view.networks == {NID_C, NID_X}
        routes[f"/networks/{NID_X}"] = (500, {"message": "boom"})
        with pytest.raises(DockerUnavailable, match="boom"):
            fetch_docker_view("unix://" + sock, 2.0, "calico")
        routes[f"/networks/{NID_X}"] = (200, b"<html>not json")
        with pytest.raises(DockerUnavailable):
            fetch_docker_view("unix://" + sock, 2.0, "calico")
        routes["/networks"] = (200, {"not": "a list"})
        with pytest.raises(DockerUnavailable):
            fetch_docker_view("unix://" + sock, 2.0, "calico")
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(DockerUnavailable):
        fetch_docker_view("unix://" + sock, 1.0, "calico")


def test_grace_from_environment(monkeypatch):
    monkeypatch.setenv(audit_mod.GRACE_ENV, "1.5")
    assert audit_mod.default_grace() == 1.5
    monkeypatch.setenv(audit_mod.GRACE_ENV, "soon")
    assert audit_mod.default_grace() == audit_mod.DEFAULT_GRACE
    monkeypatch.delenv(audit_mod.GRACE_ENV)
    assert audit_mod.default_grace() == audit_mod.DEFAULT_GRACE


# --------------------------------------------------------------------------
# entry points: backend.audit, --audit, the agent's start-up


def test_backend_audit_and_cli(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(audit_mod, "list_devices", lambda: [])
    env.container(NID_C, EID2, device=False)
    summary = env.backend.audit(dry_run=True)          # no dockerd at that socket
    assert summary["docker"].startswith("unreachable") and summary["endpoints_removed"] == []
    state = str(tmp_path / "cli.db")
    cfg = tmp_path / "plugin.cfg"
    cfg.write_text(f'backend = "calico"\nstate_dir = "{tmp_path}/run"\n'
                   f'[datastore]\ntype = "embedded"\npath = "{state}"\n'
                   f'[calico]\nhostname = "{HOST}"\n'
                   f'docker_endpoint = "unix://{tmp_path}/none.sock"\ndocker_timeout = 1\n')
    assert cli.main(["--audit", "--dry-run", "-f", str(cfg)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["docker"].startswith("unreachable") and out["dry_run"] is True


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_host_agent_starts_the_audit_loop_and_survives_its_failure(env, monkeypatch):
    import backends.calico.agent as agent_mod
    order = []

    class FakeAgent:
        watch_prefixes = ()

        def fail_closed_start(self):
            pass

        def __init__(self, datastore, hostname, **options):
            order.append("agent")

        def run(self, stop, watched=False):
            order.append("run")

    def broken_run(self, stop):
        order.append("audit")
        raise RuntimeError("datastore on fire")

    monkeypatch.setattr(agent_mod, "PolicyAgent", FakeAgent)
    monkeypatch.setattr(audit_mod.AuditLoop, "run", broken_run)
    env.backend.host_agent().run(threading.Event())
    for t in threading.enumerate():       # its failure is reported in this test
        if t.name == "audit-loop":
            t.join(5)
    assert sorted(order) == ["agent", "audit", "run"]


def test_host_agent_audit_loop_removes_leaks_and_stops_with_the_agent(env, monkeypatch):
    import backends.calico.agent as agent_mod
    env.container(NID_C, EID2)
    stop = threading.Event()

    class FakeAgent:
        watch_prefixes = ()

        def fail_closed_start(self):
            pass

        def __init__(self, *a, **options):
            pass

        def run(self, stop_, watched=False):
            for _ in range(300):
                if not env.endpoint_ids():
                    break
                stop_.wait(0.05)
            stop_.set()

    monkeypatch.setattr(agent_mod, "PolicyAgent", FakeAgent)
    monkeypatch.setattr(audit_mod, "fetch_docker_view", lambda *a: env.view())
    monkeypatch.setattr(audit_mod, "list_devices", env.list_devices)
    monkeypatch.setattr(audit_mod, "delete_device", env.delete_device)
    monkeypatch.setenv(audit_mod.GRACE_ENV, "0.1")
    env.backend.host_agent().run(stop)
    assert not [t for t in threading.enumerate() if t.name == "audit-loop"]
    assert env.endpoint_ids() == [] and env.allocated() == set() and env.devices == []


# the loop (AuditLoop on netplugin.reconcile.Reconciler) -----------------------


def loop_of(env, grace=0.2, interval=30.0):
    return audit_mod.AuditLoop(env.backend, interval=interval, grace=grace,
                               docker_view=env.docker_view, devices=env.list_devices,
                               delete_device=env.delete_device)


def run_cycle(loop, max_steps=10):
    """Step the loop (sleeping what it asks, when short) until a cycle completes."""
    before = loop.cycles
    for _ in range(max_steps):
        delay = loop.reconciler.step()
        if loop.cycles > before:
            return loop.last_summary
        time.sleep(min(delay, 0.5))
    raise AssertionError("no audit cycle completed")


def test_loop_confirms_a_leak_at_a_later_look_then_removes_it(env):
    ip1 = env.container(NID_C, EID1)
    env.container(NID_C, EID2)
    env.views = [env.view(endpoints=[EID1], addresses=[ip1])]
    loop = loop_of(env, grace=0.3)
    assert loop.reconciler.step() == pytest.approx(0.3, abs=0.05)   # first look
    assert env.endpoint_ids() == sorted([EID1, EID2])               # nothing yet
    assert loop.reconciler.step() < 0.3                               # not due yet
    time.sleep(0.3)
    summary = run_cycle(loop)
    assert summary["endpoints_removed"] == [EID2]
    assert summary["devices_removed"] == [cali(EID2)]
    assert len(summary["addresses_released"]) == 1
    assert env.endpoint_ids() == [EID1] and env.allocated() == {ip1}
    # later runs: nothing leaked, one look per interval
    assert loop.reconciler.step() == 30.0
    assert removed(loop.last_summary) == ([], [], [])


def test_loop_waits_for_docker_with_backoff_and_runs_when_it_is_back(env):
    env.container(NID_C, EID2)
    down = DockerUnavailable("connection refused")
    env.views = [down, down, down, env.view()]
    loop = loop_of(env, grace=0.0)
    assert [loop.reconciler.step() for _ in range(3)] == [1.0, 2.0, 4.0]
    assert env.endpoint_ids() == [EID2]                # nothing while Docker is down
    summary = run_cycle(loop)
    assert summary["endpoints_removed"] == [EID2] and loop.reconciler.failures == 0


def test_loop_removes_nothing_that_one_look_saw_in_use(env):
    """A momentarily empty (or partial) answer of Docker is not enough: an
    endpoint Docker knows at either look is kept."""
    ip1 = env.container(NID_C, EID1)
    env.views = [env.view(), env.view(endpoints=[EID1], addresses=[ip1]), env.view()]
    loop = loop_of(env, grace=0.0)
    summary = run_cycle(loop)
    assert removed(summary) == ([], [], [])
    assert env.endpoint_ids() == [EID1] and env.allocated() == {ip1}


def test_loop_keeps_what_changed_between_the_looks(env):
    """Version check: a record rewritten, or a block that changed, between the
    first look and the removal is kept for the next cycle."""
    ip2 = env.container(NID_C, EID2)
    env.views = [env.view()]
    loop = loop_of(env, grace=0.0)
    loop.reconciler.step()                               # first look
    key = keys.endpoint(HOST, EID2)
    env.inner.put(key, env.inner.get(key).value)         # same value, new version
    env.request_address()                                # the block changes too
    summary = run_cycle(loop)
    assert summary["endpoints_removed"] == []
    assert ip2 not in summary["addresses_released"]
    assert EID2 in env.endpoint_ids()
    # unchanged since: the next cycle removes it
    summary = run_cycle(loop)
    assert summary["endpoints_removed"] == [EID2]


def test_loop_sweeps_a_removed_host_and_forgets_its_own_removal(env):
    from backends.calico import hosts
    from backends.calico import ipam as ci
    ipam = ci.CalicoIpam(env.store)
    ghost_ip = ipam.auto_assign_one(4, "ghost")
    block = ci.block_cidr_for(ghost_ip)
    env.inner.put("/calico/v1/host/ghost/bird_ip", "192.0.2.9")
    hosts.mark_removed(env.store, "ghost")
    hosts.mark_removed(env.store, HOST)                  # this host was removed, is back
    env.views = [env.view()]
    loop = loop_of(env, grace=0.0)
    stop = threading.Event()
    stop.set()
    loop.run(stop)                                       # start-up part only
    assert HOST not in hosts.removed_hosts(env.store)
    summary = run_cycle(loop)
    swept = summary["hosts_swept"]["ghost"]
    assert swept["addresses_released"] == [str(ghost_ip)]
    assert swept["blocks_deleted"] == [str(block)]
    assert ipam.affine_blocks("ghost", 4) == []
    assert not env.inner.list_prefix("/calico/v1/host/ghost/")


# --------------------------------------------------------------------------
# real devices, in a throwaway network namespace

netns = pytest.mark.skipif(netns_unavailable_reason() is not None,
                           reason=str(netns_unavailable_reason()))


@netns
def test_real_devices_and_routes_in_a_netns(tmp_path):
    out = run_in_netns(f"""
import subprocess
from backends.calico.audit import DockerView, auditor_for, list_devices
from netplugin import protocol as p
import tests.unit.test_calico_audit as t

backend, store = calico_backend({str(tmp_path / 'state.db')!r}, hostname=t.HOST)
backend.create_network(p.CreateNetworkRequest.parse({{
    "NetworkID": t.NID_D, "Options": {{}}, "IPv6Data": [],
    "IPv4Data": [{{"AddressSpace": "LocalDefault", "Pool": "192.168.50.0/24",
                  "Gateway": "192.168.50.1/24"}}]}}))
def ip(*a):
    subprocess.run(["ip", *a], check=True)
for eid in (t.EID1, t.EID2):
    backend.create_endpoint(p.CreateEndpointRequest.parse({{
        "NetworkID": t.NID_D, "EndpointID": eid,
        "Interface": {{"Address": "192.168.50.%d/24" % (eid == t.EID1 and 2 or 3)}},
        "Options": {{}}}}))
    backend.join(p.JoinRequest.parse({{"NetworkID": t.NID_D, "EndpointID": eid,
        "SandboxKey": "/var/run/docker/netns/" + eid[:12], "Options": {{}}}}))
# a veth of someone else, a stray pair of ours (marked) without any record,
# and a Calico CNI veth (cali + 11 hex, no marker) without any record
ip("link", "add", "calimine", "type", "veth", "peer", "name", "tmpmine")
ip("link", "add", t.cali(t.EID3), "type", "veth", "peer", "name", t.tmp(t.EID3))
ip("link", "set", t.cali(t.EID3), "alias", "netplugin:calico:" + t.EID3)
ip("link", "add", t.cali(t.EID4), "type", "veth", "peer", "name", t.tmp(t.EID4))
before = sorted(d.name for d in list_devices())
view = DockerView(frozenset([t.EID1]), frozenset([t.NID_D]), frozenset(), 1)
summary = auditor_for(backend, docker_view=lambda: view, grace=0).run()
emit({{"before": before, "summary": summary, "after": sorted(links()),
       "routes": [r["dst"] for r in routes()]}})
""")
    s = out["summary"]
    assert sorted([t for t in out["before"] if t.startswith(("cali", "tmp"))]) == sorted(
        [cali(EID1), tmp(EID1), cali(EID2), tmp(EID2), "calimine", "tmpmine",
         cali(EID3), tmp(EID3), cali(EID4), tmp(EID4)])
    assert s["endpoints_removed"] == [EID2]
    assert s["devices_removed"] == sorted([cali(EID2), tmp(EID2), cali(EID3), tmp(EID3)])
    assert s["addresses_released"] == []
    assert sorted(out["after"]) == sorted(
        ["lo", cali(EID1), tmp(EID1), "calimine", "tmpmine", cali(EID4), tmp(EID4)])
    assert any(cali(EID4) in line and "left alone" in line for line in s["skipped"])
    assert "192.168.50.2" in out["routes"] and "192.168.50.3" not in out["routes"]


def test_unmarked_cali_veth_and_its_endpoint_record_are_left_alone(env):
    """Calico CNI names its veths cali<11 hex> too: a veth without Join's
    marker is never deleted, and an endpoint record whose veth exists
    without the marker is kept (its veth is not gone)."""
    env.container(NID_D, EID1, calico_ipam=False)
    env.devices.clear()
    env.add_device(EID1, marked=False)     # same name as the record's veth
    env.add_device(EID2, marked=False)     # no record at all
    env.views = [env.view()]
    summary = env.audit()
    assert removed(summary) == ([], [], [])
    assert env.deleted == [] and env.endpoint_ids() == [EID1]
    assert any("without netplugin's marker" in s for s in summary["skipped"])


def test_loop_sweeps_a_removed_hosts_block_only_when_unchanged_between_looks(env):
    from backends.calico import hosts
    from backends.calico import ipam as ci
    ipam = ci.CalicoIpam(env.store)
    first_ip = ipam.auto_assign_one(4, "ghost")
    hosts.mark_removed(env.store, "ghost")
    env.views = [env.view()]
    loop = loop_of(env, grace=0.0)
    loop.reconciler.step()                               # first look
    late_ip = ipam.auto_assign_one(4, "ghost")           # the dying host writes late
    assert ci.block_cidr_for(late_ip) == ci.block_cidr_for(first_ip)
    summary = run_cycle(loop)
    swept = summary["hosts_swept"].get("ghost", {})
    assert not swept.get("blocks_deleted") and not swept.get("addresses_released")
    # the block changed since the first look: it keeps its addresses (the
    # unchanged affinity key goes: no host routes the block to ghost any more)
    assert ipam.read_block(ci.block_cidr_for(first_ip)).allocated() == sorted(
        [first_ip, late_ip])
    summary = run_cycle(loop)                            # unchanged since: swept
    swept = summary["hosts_swept"]["ghost"]
    assert sorted(swept["addresses_released"]) == sorted([str(first_ip), str(late_ip)])
    assert ipam.affine_blocks("ghost", 4) == [] and env.allocated() == set()
