"""The IPAM protocol as swarm drives it, against the embedded datastore: the
manager allocates in the global address space, every node asks again in the
local one for exactly the manager's address; each address is allocated once
and freed once, and a real conflict still fails."""
from __future__ import annotations

import json

import pytest

import backends.calico.driver  # noqa: F401  (registers "calico")
from backends.calico import ipam as ci
from backends.calico import ipam_driver as drv
from backends.calico import model as keys
from backends.calico.driver import CalicoBackend
from netplugin import protocol as p
from netplugin.config import config_from_text
from netplugin.datastore import CountingDatastore
from netplugin.datastore.embedded import EmbeddedDatastore
from netplugin.errors import Conflict

POOL = "10.20.0.0/24"


@pytest.fixture
def store(tmp_path):
    s = CountingDatastore(EmbeddedDatastore(str(tmp_path / "state.db")))
    s.put(keys.pool(POOL), json.dumps({"cidr": POOL}))
    yield s
    s.inner.close()


def node(store, name):
    cfg = config_from_text(f'backend = "calico"\n[calico]\nhostname = "{name}"\n')
    return CalicoBackend(cfg, store)


def request_pool(backend, space, pool=""):
    return backend.request_pool(p.RequestPoolRequest.parse(
        {"AddressSpace": space, "Pool": pool, "Options": {}, "V6": False}))


def request_address(backend, pool_id, address=""):
    return backend.request_address(p.RequestAddressRequest.parse(
        {"PoolID": pool_id, "Address": address, "Options": {}})).address.split("/")[0]


def release(backend, pool_id, address):
    backend.release_address(p.ReleaseAddressRequest.parse(
        {"PoolID": pool_id, "Address": address}))


def allocated(store):
    out = []
    for item in store.inner.list_prefix(ci.block_dir(4)):
        out += [str(a) for a in ci.Block.from_item(item.key, item.value, item.version).allocated()]
    return sorted(out)


@pytest.mark.parametrize("subnet", ["", "10.20.0.0/25"])
def test_manager_allocates_nodes_reuse_and_each_release_frees_once(store, subnet):
    manager, worker = node(store, "mgr"), node(store, "wrk")
    space = drv.GLOBAL_ADDRESS_SPACE
    g = request_pool(manager, space, subnet)
    assert g.pool_id.startswith(drv.SWARM_PREFIX)
    tasks = [request_address(manager, g.pool_id) for _ in range(3)]
    vip = request_address(manager, g.pool_id)
    assert len(set(tasks + [vip])) == 4 and allocated(store) == sorted(tasks + [vip])

    # The worker learns the network: the manager's pool, in its local space.
    local = request_pool(worker, drv.LOCAL_ADDRESS_SPACE, g.pool)
    assert not local.pool_id.startswith(drv.SWARM_PREFIX)
    for ip in tasks[:2]:
        assert request_address(worker, local.pool_id, ip) == ip
        assert request_address(worker, local.pool_id, ip) == ip      # asked again: same
    assert request_address(manager, request_pool(
        manager, drv.LOCAL_ADDRESS_SPACE, g.pool).pool_id, tasks[2]) == tasks[2]
    assert allocated(store) == sorted(tasks + [vip])                 # nothing twice

    # Nodes release: nothing is freed; the manager's releases free each once.
    for ip in tasks[:2]:
        release(worker, local.pool_id, ip)
    assert allocated(store) == sorted(tasks + [vip])
    for ip in tasks:
        release(manager, g.pool_id, ip)
    assert allocated(store) == [vip]
    # The network goes: its pool takes what Docker never released (the VIP).
    manager.release_pool(p.ReleasePoolRequest.parse({"PoolID": g.pool_id}))
    assert allocated(store) == []
    assert list(store.inner.list_prefix("/calico/ipam/v2/handle/")) == []


def test_each_global_pool_request_names_its_own_network(store):
    manager = node(store, "mgr")
    one = request_pool(manager, drv.GLOBAL_ADDRESS_SPACE).pool_id
    two = request_pool(manager, drv.GLOBAL_ADDRESS_SPACE).pool_id
    assert one != two
    a, b = request_address(manager, one), request_address(manager, two)
    manager.release_pool(p.ReleasePoolRequest.parse({"PoolID": one}))
    assert allocated(store) == [b] and a != b


def test_a_real_conflict_still_fails(store):
    a, b = node(store, "a"), node(store, "b")
    local = request_pool(a, drv.LOCAL_ADDRESS_SPACE).pool_id
    ip = request_address(a, local)
    with pytest.raises(Conflict):
        request_address(b, local, ip)              # a local address of another host
    g = request_pool(a, drv.GLOBAL_ADDRESS_SPACE).pool_id
    taken = request_address(a, g)
    with pytest.raises(Conflict):
        request_address(b, g, taken)               # the manager asked twice for one address
    release(b, local, taken)                       # a node's release of it: kept
    assert taken in allocated(store)
