"""Ownership of Calico IPAM addresses the IPAM driver hands out: every
allocation carries the handle ``netplugin.<pool tag>.<owner>``; only the
PoolID that handed an address out releases it; the same owner asking again
is answered, another refused.  Embedded datastore."""
from __future__ import annotations

import ipaddress
import json

import pytest

import backends.calico.driver  # noqa: F401  (registers "calico")
from backends.calico import audit as calico_audit
from backends.calico import ipam as ci
from backends.calico import ipam_driver as drv
from backends.calico import model as keys
from backends.calico.driver import CalicoBackend
from netplugin import protocol as p
from netplugin.config import config_from_text
from netplugin.datastore import CountingDatastore
from netplugin.datastore.embedded import EmbeddedDatastore

POOL = "10.30.0.0/24"
POOL_B = "10.31.0.0/24"
MAC = "02:42:0a:1e:00:05"


@pytest.fixture
def store(tmp_path):
    s = CountingDatastore(EmbeddedDatastore(str(tmp_path / "state.db")))
    for cidr in (POOL, POOL_B):
        s.put(keys.pool(cidr), json.dumps({"cidr": cidr}))
    yield s
    s.inner.close()


@pytest.fixture
def backend(store):
    cfg = config_from_text('backend = "calico"\n[calico]\nhostname = "h1"\n')
    return CalicoBackend(cfg, store)


def dump(store):
    return {i.key: i.value for i in store.inner.list_prefix("/calico")}


def ask(backend, pool_id, address="", mac=None):
    opts = {p.MAC_OPTION: mac} if mac else None
    return backend.request_address(p.RequestAddressRequest.parse(
        {"PoolID": pool_id, "Address": address, "Options": opts})).address.split("/")[0]


def release(backend, pool_id, address):
    backend.release_address(p.ReleaseAddressRequest.parse({"PoolID": pool_id,
                                                           "Address": address}))


def handle_of(backend, ip):
    return backend.ipam.attributes_of(ipaddress.ip_address(ip))["handle_id"]


def test_handle_names_the_pool_and_the_request():
    assert drv.pool_tag("10.30.0.0/24") == "10.30.0.0-24"
    assert drv.pool_tag("swarm:abc:10.30.0.0/24") == "10.30.0.0-24"
    assert drv.request_owner({p.MAC_OPTION: "02:42:0A:1E:00:05"}) == ("mac-02420a1e0005", True)
    owner, named = drv.request_owner({})
    assert owner.startswith("req-") and not named
    assert drv.request_owner({})[0] != owner
    h = drv.address_handle("fd00::/64", "mac-02420a1e0005")
    assert h == "netplugin.fd00::-64.mac-02420a1e0005"
    assert drv.handle_pool_tag(h) == "fd00::-64"
    assert drv.handle_pool_tag("swarm-abc") is None and drv.handle_pool_tag(None) is None
    with pytest.raises(drv.InvalidRequest, match="not a MAC"):
        drv.request_owner({p.MAC_OPTION: "zz"})


def test_every_allocation_records_a_handle_and_its_key(store, backend):
    ip = ask(backend, "CalicoPoolIPv4")
    handle = handle_of(backend, ip)
    assert handle.startswith("netplugin.CalicoPoolIPv4.req-")
    value = json.loads(store.inner.get(ci.handle_key(handle)).value)
    assert value["block"] == {str(ci.block_cidr_for(ip)): 1}
    pid = backend.request_pool(p.RequestPoolRequest.parse({"Pool": POOL})).pool_id
    fixed = ask(backend, pid, "10.30.0.9")
    assert handle_of(backend, fixed).startswith("netplugin.10.30.0.0-24.req-")
    release(backend, pid, fixed)
    release(backend, "CalicoPoolIPv4", ip)
    assert not [k for k in dump(store) if "/handle/" in k]


def test_release_with_another_pools_id_is_refused_and_changes_nothing(store, backend):
    a = backend.request_pool(p.RequestPoolRequest.parse({"Pool": POOL})).pool_id
    b = backend.request_pool(p.RequestPoolRequest.parse({"Pool": POOL_B})).pool_id
    ip = ask(backend, a)
    before = dump(store)
    for wrong in (b, "CalicoPoolIPv4", "swarm:0123:" + a):
        with pytest.raises(drv.NotOwner, match="not handed out by pool"):
            release(backend, wrong, ip)
    assert dump(store) == before
    with pytest.raises(drv.NotAllocated):
        release(backend, a, "10.30.0.200")
    assert dump(store) == before
    release(backend, a, ip)
    assert backend.ipam.attributes_of(ipaddress.ip_address(ip)) is None


def test_same_owner_is_answered_again_another_is_refused(store, backend):
    pid = backend.request_pool(p.RequestPoolRequest.parse({"Pool": POOL})).pool_id
    assert ask(backend, pid, "10.30.0.7", mac=MAC) == "10.30.0.7"
    before = dump(store)
    assert ask(backend, pid, "10.30.0.7", mac=MAC) == "10.30.0.7"     # idempotent
    assert dump(store) == before
    with pytest.raises(ci.AddressInUse):
        ask(backend, pid, "10.30.0.7", mac="02:42:0a:1e:00:06")         # another endpoint
    with pytest.raises(ci.AddressInUse):
        ask(backend, pid, "10.30.0.7")                                 # anonymous
    auto = ask(backend, "CalicoPoolIPv4", mac=MAC)
    assert ask(backend, "CalicoPoolIPv4", mac=MAC) == auto            # replayed request
    assert auto != "10.30.0.7"
    assert dump(store) != before


def test_allocation_without_handle_is_released_by_a_pool_holding_it(store, backend):
    legacy = backend.ipam.assign_ip(ipaddress.ip_address("10.30.0.50"), "h1")  # no handle
    other = backend.ipam.assign_ip(ipaddress.ip_address("10.30.0.51"), "h1")
    with pytest.raises(drv.NotOwner):
        release(backend, POOL_B, str(legacy))                          # not in that pool
    release(backend, POOL, str(legacy))
    release(backend, "CalicoPoolIPv4", str(other))
    assert backend.ipam.attributes_of(other) is None


def test_foreign_handles_are_never_released(store, backend):
    ip = backend.ipam.assign_ip(ipaddress.ip_address("10.30.0.60"), "h1",
                                handle_id="k8s-pod-network.abc")
    for pid in (POOL, "CalicoPoolIPv4"):
        with pytest.raises(drv.NotOwner):
            release(backend, pid, str(ip))
    assert backend.ipam.attributes_of(ip) is not None


def test_audit_may_release_ours_never_swarms_or_foreign(store, backend):
    mine = ipaddress.ip_address(ask(backend, "CalicoPoolIPv4"))
    g = backend.request_pool(p.RequestPoolRequest.parse(
        {"AddressSpace": drv.GLOBAL_ADDRESS_SPACE})).pool_id
    swarm = ipaddress.ip_address(ask(backend, g))
    foreign = backend.ipam.assign_ip(ipaddress.ip_address(str(mine + 10)), "h1",
                                     handle_id="k8s-pod-network.x")
    block = backend.ipam.read_block(ci.block_cidr_for(mine))
    orphans = calico_audit.Auditor._orphans(block, set())
    assert mine in orphans and swarm not in orphans and foreign not in orphans
