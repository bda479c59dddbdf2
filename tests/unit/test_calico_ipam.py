"""Calico IPAM v2 (backends.calico.ipam) and the IpamDriver calls
(backends.calico.ipam_driver) against the real embedded datastore and a real
etcd: keys and JSON exactly as libcalico writes them, allocation order,
claims and lost races, borrowing, specific addresses, release, handles,
config, pool answers, datastore costs, and contention from several
processes on one etcd."""
from __future__ import annotations

import ipaddress
import json
import multiprocessing
import threading
import time
import traceback

import pytest

import backends.calico.driver  # noqa: F401  (registers "calico")
from backends.calico import ipam as ci
from backends.calico import model as keys
from backends.calico import ipam_driver as drv
from backends.calico.driver import CalicoBackend
from backends.calico.ipam import CalicoIpam
from netplugin import protocol as p
from netplugin.app import create_app
from netplugin.config import config_from_text
from netplugin.datastore import CountingDatastore, DatastoreUnavailable, KeyExists, KeyNotFound
from netplugin.datastore.embedded import EmbeddedDatastore
from netplugin.datastore.etcd import EtcdDatastore
from netplugin.errors import Conflict, InvalidRequest, NotFound, NotSupported, PluginError
from tests.datastore_servers import run_etcd

HOST = "host-a"
OTHER = "host-b"
POOL = "10.10.0.0/24"           # 4 blocks
POOL6 = "fd80:24e2:f998:72d6::/64"


# --------------------------------------------------------------------------
# fixtures: the embedded store and a private etcd (Calico keys are global)


@pytest.fixture(scope="module")
def etcd_url():
    with run_etcd() as server:
        yield server.url


@pytest.fixture(params=["embedded", "etcd"])
def store(request, tmp_path):
    if request.param == "embedded":
        inner = EmbeddedDatastore(str(tmp_path / "state.db"))
    else:
        inner = EtcdDatastore([request.getfixturevalue("etcd_url")])
        inner.delete_prefix("/calico")
    counting = CountingDatastore(inner)
    try:
        yield counting
    finally:
        if request.param == "etcd":
            inner.delete_prefix("/calico")
        inner.close()


@pytest.fixture
def ipam(store):
    return CalicoIpam(store)


def make_backend(store, hostname=HOST):
    cfg = config_from_text(f'backend = "calico"\n[calico]\nhostname = "{hostname}"\n')
    return CalicoBackend(cfg, store)


@pytest.fixture
def backend(store):
    return make_backend(store)


def add_pool(store, cidr, **fields):
    value = {"cidr": cidr}
    value.update(fields)
    store.inner.put(keys.pool(cidr), json.dumps(value))


def dump(store, prefix="/calico"):
    out = {}
    for item in store.inner.list_prefix(prefix):
        try:
            out[item.key] = json.loads(item.value)
        except ValueError:
            out[item.key] = item.value
    return out


def block_json(store, cidr):
    return json.loads(store.inner.get(ci.block_key(cidr)).value)


def first_candidate(pool, host=HOST, within=None):
    pools = [ci.Pool(ipaddress.ip_network(pool))]
    return next(CalicoIpam._candidates(pools, host, within))


def counted(store, call, *args, **kwargs):
    store.reset()
    result = call(*args, **kwargs)
    return result, store.counts


def budget(r, w, d):
    return {"R": r, "W": w, "D": d}


def ops(store):
    return [(kind, op, key) for kind, op, key in store.log]


def addr_req(pool_id, address="", gateway=False):
    opts = {"RequestAddressType": "com.docker.network.gateway"} if gateway else None
    return p.RequestAddressRequest.parse({"PoolID": pool_id, "Address": address,
                                          "Options": opts})


def pool_req(pool="", v6=False, options=None, sub_pool=""):
    return p.RequestPoolRequest.parse({"AddressSpace": "CalicoLocalAddressSpace",
                                       "Pool": pool, "SubPool": sub_pool,
                                       "Options": options or {}, "V6": v6})


# --------------------------------------------------------------------------
# keys


def test_keys_as_calico_writes_them():
    assert keys.pool("192.168.0.0/16") == "/calico/v1/ipam/v4/pool/192.168.0.0-16"
    assert keys.pool(POOL6) == "/calico/v1/ipam/v6/pool/fd80:24e2:f998:72d6::-64"
    assert ci.block_key("192.168.45.0/26") == \
        "/calico/ipam/v2/assignment/ipv4/block/192.168.45.0-26"
    assert ci.block_key("fd80:24e2:f998:72d6::40/122") == \
        "/calico/ipam/v2/assignment/ipv6/block/fd80:24e2:f998:72d6::40-122"
    assert ci.host_affinity_key("docker-host-1", "192.168.45.0/26") == \
        "/calico/ipam/v2/host/docker-host-1/ipv4/block/192.168.45.0-26"
    assert ci.host_affinity_key("h", "fd80::40/122") == \
        "/calico/ipam/v2/host/h/ipv6/block/fd80::40-122"
    assert ci.handle_key("abc") == "/calico/ipam/v2/handle/abc"
    assert ci.CONFIG_KEY == "/calico/ipam/v2/config"
    assert str(ci.block_cidr_for("192.168.45.77")) == "192.168.45.64/26"
    assert str(ci.block_cidr_for("fd80::1:ff")) == "fd80::1:c0/122"
    assert str(ci.cidr_from_key("/x/fd80:24e2:f998:72d6::40-122")) == \
        "fd80:24e2:f998:72d6::40/122"


def test_candidates_are_seeded_by_host_and_stay_in_the_pool():
    pools = [ci.Pool(ipaddress.ip_network("10.0.0.0/16"))]
    a = list(CalicoIpam._candidates(pools, HOST, None))
    assert len(a) == 1024 and len(set(a)) == 1024
    assert all(c.prefixlen == 26 and c.subnet_of(pools[0].cidr) for c in a)
    assert a == list(CalicoIpam._candidates(pools, HOST, None))       # deterministic
    assert a[0] != list(CalicoIpam._candidates(pools, "another-host", None))[0]
    # a subnet smaller than a block: the one block holding it
    within = ipaddress.ip_network("10.0.3.16/28")
    assert list(CalicoIpam._candidates(pools, HOST, within)) == \
        [ipaddress.ip_network("10.0.3.0/26")]
    # IPv6 /64: 2**58 candidates, generated lazily
    pools6 = [ci.Pool(ipaddress.ip_network(POOL6))]
    c6 = next(CalicoIpam._candidates(pools6, HOST, None))
    assert c6.prefixlen == 122 and c6.subnet_of(pools6[0].cidr)


# --------------------------------------------------------------------------
# auto-assign: the claim, the block JSON, the costs


def test_first_address_claims_a_block_exactly_as_calico(store, ipam):
    add_pool(store, POOL)
    block = first_candidate(POOL)
    ip, counts = counted(store, ipam.auto_assign_one, 4, HOST)
    assert ip == block.network_address        # ordinal 0 first
    affinity_key = ci.host_affinity_key(HOST, block)
    assert ops(store) == [
        ("R", "list_prefix", f"/calico/ipam/v2/host/{HOST}/ipv4/block/"),
        ("R", "get", "/calico/ipam/v2/config"),
        ("R", "list_prefix", "/calico/v1/ipam/v4/pool/"),
        ("R", "get", ci.block_key(block)),
        ("W", "put", affinity_key),
        ("W", "create", ci.block_key(block)),
        ("W", "compare_and_swap", ci.block_key(block)),
    ]
    assert counts == budget(4, 3, 0)
    assert store.inner.get(affinity_key).value == ""
    assert block_json(store, block) == {
        "cidr": str(block),
        "affinity": f"host:{HOST}",
        "strict_affinity": False,
        "allocations": [0] + [None] * 63,
        "unallocated": list(range(1, 64)),
        "attributes": [{"handle_id": None, "secondary": None}],
    }
    # the raw JSON keeps libcalico's field order
    raw = store.inner.get(ci.block_key(block)).value
    assert list(json.loads(raw)) == ["cidr", "affinity", "strict_affinity", "allocations",
                                     "unallocated", "attributes"]


def test_address_from_a_block_with_room_costs_2r_1w(store, ipam):
    add_pool(store, POOL)
    first = ipam.auto_assign_one(4, HOST)
    ip, counts = counted(store, ipam.auto_assign_one, 4, HOST)
    assert ip == first + 1
    # Calico's table: >=2R >=1W; with room in the affine block exactly the
    # affinity list, the block read and the CAS write.
    assert counts == budget(2, 1, 0)
    assert [k for _, _, k in ops(store)] == [
        f"/calico/ipam/v2/host/{HOST}/ipv4/block/", ci.block_key(ci.block_cidr_for(first)),
        ci.block_key(ci.block_cidr_for(first))]


def test_allocation_order_fills_a_block_then_claims_the_next(store, ipam):
    add_pool(store, POOL)
    ips = [ipam.auto_assign_one(4, HOST) for _ in range(64)]
    block = ci.block_cidr_for(ips[0])
    assert ips == list(block)                       # ordinals 0..63 in order
    data = block_json(store, block)
    assert data["allocations"] == [0] * 64 and data["unallocated"] == []
    nxt, counts = counted(store, ipam.auto_assign_one, 4, HOST)
    assert ci.block_cidr_for(nxt) != block and nxt == ci.block_cidr_for(nxt).network_address
    # full affine block read, then config, pools, one candidate read (the full
    # block is skipped without a read), claim: bounded
    assert counts["R"] <= 5 and counts["W"] == 3 and counts["D"] == 0
    assert sorted(ipam.affine_blocks(HOST, 4)) == sorted([block, ci.block_cidr_for(nxt)])


def test_ipv6_blocks_are_122(store, ipam):
    add_pool(store, POOL6)
    ip = ipam.auto_assign_one(6, HOST)
    block = ci.block_cidr_for(ip)
    assert block.prefixlen == 122 and ip == block.network_address
    assert block.subnet_of(ipaddress.ip_network(POOL6))
    data = block_json(store, block)
    assert data["cidr"] == str(block) and len(data["allocations"]) == 64
    assert store.inner.get(ci.host_affinity_key(HOST, block)).value == ""


def test_exhausted_pool_error(store, ipam):
    add_pool(store, "10.20.0.0/26")
    got = [ipam.auto_assign_one(4, HOST) for _ in range(64)]
    assert len(set(got)) == 64
    with pytest.raises(ci.PoolExhausted) as exc:
        ipam.auto_assign_one(4, HOST)
    assert str(exc.value) == "no free address in pool(s) 10.20.0.0/26"
    assert isinstance(exc.value, Conflict)


def test_no_pool_at_all(store, ipam):
    with pytest.raises(ci.NoPools, match="no enabled Calico IPv4 IPAM pool"):
        ipam.auto_assign_one(4, HOST)


def test_pool_flags_and_shapes(store, ipam):
    add_pool(store, "10.1.0.0/24", ipam=False)           # a default-IPAM network's pool
    add_pool(store, "10.2.0.0/24", disabled=True)
    add_pool(store, "10.3.0.0/28")                       # smaller than a block
    # Go writer: every field
    store.inner.put(keys.pool("10.4.0.0/24"), json.dumps(
        {"cidr": "10.4.0.0/24", "ipip": "", "masquerade": False, "ipam": True,
         "disabled": False, "ipip_mode": ""}))
    store.inner.put(keys.pool("10.5.0.0/24"), "not json")
    store.inner.put(keys.pool("10.6.0.0/24"), "{}")    # no cidr: from the key
    pools = {str(pl.cidr): pl.state() for pl in ipam.pools(4)}
    assert pools == {"10.1.0.0/24": "ipam disabled", "10.2.0.0/24": "disabled",
                     "10.3.0.0/28": "smaller than a /26 block", "10.4.0.0/24": "enabled",
                     "10.6.0.0/24": "enabled"}
    seen = {str(ci.block_cidr_for(ipam.auto_assign_one(4, h)).supernet(new_prefix=24))
            for h in ("h1", "h2", "h3", "h4", "h5", "h6")}
    assert seen <= {"10.4.0.0/24", "10.6.0.0/24"}


# --------------------------------------------------------------------------
# claims: lost races


class StealingStore(CountingDatastore):
    """Creates the block first (for ``thief``) when we try to create it."""

    def __init__(self, inner, thief):
        super().__init__(inner)
        self.thief = thief
        self.stolen = []

    def create(self, key, value):
        if "/assignment/" in key and not self.stolen:
            data = json.loads(value)
            data["affinity"] = f"host:{self.thief}"
            self.inner.create(key, json.dumps(data))
            self.stolen.append(key)
        return super().create(key, value)


def test_claim_lost_to_another_host_moves_on_and_cleans_up(store):
    add_pool(store, "10.30.0.0/25")                       # two blocks
    thief = StealingStore(store.inner, OTHER)
    ipam = CalicoIpam(thief)
    ip = ipam.auto_assign_one(4, HOST)
    stolen = first_candidate("10.30.0.0/25")
    assert thief.stolen == [ci.block_key(stolen)]
    mine = ci.block_cidr_for(ip)
    assert mine != stolen and ip == mine.network_address
    # our affinity key for the stolen block was deleted again
    with pytest.raises(KeyNotFound):
        store.inner.get(ci.host_affinity_key(HOST, stolen))
    assert ipam.affine_blocks(HOST, 4) == [mine]
    assert block_json(store, stolen)["affinity"] == f"host:{OTHER}"


def test_claim_lost_to_a_process_of_the_same_host_uses_the_block(store):
    add_pool(store, "10.30.0.0/25")
    same = StealingStore(store.inner, HOST)
    ipam = CalicoIpam(same)
    ip = ipam.auto_assign_one(4, HOST)
    block = first_candidate("10.30.0.0/25")
    assert ci.block_cidr_for(ip) == block and ip == block.network_address
    assert ipam.affine_blocks(HOST, 4) == [block]


def test_listed_affine_block_missing_is_retried_then_claimed(store, ipam):
    add_pool(store, POOL)
    block = first_candidate(POOL)
    store.inner.put(ci.host_affinity_key(HOST, block), "")   # stale affinity key
    ip, counts = counted(store, ipam.auto_assign_one, 4, HOST)
    assert ci.block_cidr_for(ip) == block
    reads = [k for kind, op, k in ops(store) if op == "get" and k == ci.block_key(block)]
    assert len(reads) == 1 + ci.KEY_ERROR_RETRIES + 1     # step 1 + retries + candidate


def test_many_claimed_blocks_switch_to_one_listing(store, ipam):
    add_pool(store, "10.40.0.0/22")                       # 16 blocks
    for n in range(12):                                   # other hosts own 12
        ipam.auto_assign_one(4, f"other-{n}")
    store.reset()
    ipam.auto_assign_one(4, HOST)
    candidate_reads = [k for _, op, k in ops(store) if op == "get" and "/assignment/" in k]
    assert len(candidate_reads) <= ci.WALK_READS + 1
    assert sum(1 for _, op, _ in ops(store) if op == "list_prefix") <= 3


# --------------------------------------------------------------------------
# borrowing and config


def test_borrows_from_another_hosts_block_when_pool_is_claimed(store, ipam):
    add_pool(store, "10.50.0.0/26")                       # one block
    theirs = ipam.auto_assign_one(4, OTHER)
    mine = ipam.auto_assign_one(4, HOST)
    assert mine == theirs + 1
    block = ci.block_cidr_for(mine)
    assert block_json(store, block)["affinity"] == f"host:{OTHER}"
    assert ipam.affine_blocks(HOST, 4) == []              # no affinity was taken


def test_strict_affinity_forbids_borrowing(store, ipam):
    add_pool(store, "10.50.0.0/26")
    store.inner.put(ci.CONFIG_KEY, json.dumps({"auto_allocate_blocks": True,
                                               "strict_affinity": True}))
    theirs = ipam.auto_assign_one(4, OTHER)
    assert block_json(store, ci.block_cidr_for(theirs))["strict_affinity"] is True
    with pytest.raises(ci.PoolExhausted):
        ipam.auto_assign_one(4, HOST)
    with pytest.raises(ci.NoHostAffinity, match="strict affinity"):
        ipam.assign_ip(theirs + 5, HOST)


def test_no_auto_allocate_blocks_only_borrows(store, ipam):
    add_pool(store, POOL)
    theirs = ipam.auto_assign_one(4, OTHER)
    store.inner.put(ci.CONFIG_KEY, json.dumps({"auto_allocate_blocks": False,
                                               "strict_affinity": False}))
    mine = ipam.auto_assign_one(4, HOST)
    assert ci.block_cidr_for(mine) == ci.block_cidr_for(theirs)
    assert ipam.affine_blocks(HOST, 4) == []


@pytest.mark.parametrize("value,expected", [
    (None, (True, False)),
    ("{}", (True, False)),
    ('{"auto_allocate_blocks": true, "strict_affinity": false}', (True, False)),
    ('{"auto_allocate_blocks": true, "strict_affinity": true}', (True, True)),
    ('{"auto_allocate_blocks": true}', (True, False)),          # Go, omitempty
    ('{"strict_affinity": true}', (False, True)),               # Go, omitempty
    ("garbage", (True, False)),
])
def test_ipam_config(store, ipam, value, expected):
    if value is not None:
        store.inner.put(ci.CONFIG_KEY, value)
    cfg = ipam.config()
    assert (cfg.auto_allocate_blocks, cfg.strict_affinity) == expected


def test_go_written_block_is_understood_and_kept(store, ipam):
    add_pool(store, POOL)
    block = first_candidate(POOL)
    go = {"cidr": str(block), "affinity": None, "hostAffinity": HOST,
          "strictAffinity": False, "allocations": [0, None] + [None] * 62,
          "attributes": [{"handle_id": "go-handle", "secondary": None}]}
    store.inner.put(ci.block_key(block), json.dumps(go))
    store.inner.put(ci.host_affinity_key(HOST, block), "{}")
    ip = ipam.auto_assign_one(4, HOST)
    assert ip == block.network_address + 1
    data = block_json(store, block)
    assert data["affinity"] == f"host:{HOST}" and data["hostAffinity"] == HOST
    assert data["strictAffinity"] is False and data["strict_affinity"] is False
    assert data["allocations"][:3] == [0, 1, None]
    assert data["unallocated"] == list(range(2, 64))


def test_corrupt_block_is_skipped_by_auto_assign(store, ipam):
    add_pool(store, POOL)
    block = first_candidate(POOL)
    store.inner.put(ci.block_key(block), '{"cidr": "' + str(block) + '", "allocations": []}')
    store.inner.put(ci.host_affinity_key(HOST, block), "")
    ip = ipam.auto_assign_one(4, HOST)
    assert ci.block_cidr_for(ip) != block
    with pytest.raises(ci.CorruptData, match="is corrupt"):
        ipam.assign_ip(block.network_address, HOST)


# --------------------------------------------------------------------------
# specific addresses


def test_assign_specific_ip(store, ipam):
    add_pool(store, POOL)
    ip = ipaddress.ip_address("10.10.0.77")
    assert ipam.assign_ip(ip, HOST, secondary={}) == ip
    block = ci.block_cidr_for(ip)
    data = block_json(store, block)
    assert data["affinity"] == f"host:{HOST}"
    assert data["allocations"][13] == 0 and data["attributes"] == [
        {"handle_id": None, "secondary": {}}]
    assert 13 not in data["unallocated"] and data["unallocated"][0] == 0
    assert store.inner.get(ci.host_affinity_key(HOST, block)).value == ""
    with pytest.raises(ci.AddressInUse) as exc:
        ipam.assign_ip(ip, HOST)
    assert str(exc.value) == "address 10.10.0.77 is already in use"
    # auto-assign shares the block and skips the taken ordinal
    assert ipam.auto_assign_one(4, HOST) == block.network_address
    # a second specific address in an existing block: 1R 1W
    _, counts = counted(store, ipam.assign_ip, "10.10.0.78", HOST)
    assert counts == budget(1, 1, 0)


def test_assign_specific_ip_outside_pools(store, ipam):
    add_pool(store, POOL)
    add_pool(store, "10.99.0.0/24", ipam=False)
    for address in ("10.11.0.1", "10.99.0.1"):
        with pytest.raises(ci.AddressNotInPool) as exc:
            ipam.assign_ip(address, HOST)
        assert str(exc.value) == (f"address {address} is not in any enabled Calico IPAM "
                                  f"pool (IPv4 pools: {POOL})")
    assert dump(store, "/calico/ipam") == {}


def test_assign_specific_ip_in_another_hosts_block(store, ipam):
    add_pool(store, POOL)
    theirs = ipam.auto_assign_one(4, OTHER)
    mine = ipam.assign_ip(theirs + 9, HOST)
    data = block_json(store, ci.block_cidr_for(mine))
    assert data["affinity"] == f"host:{OTHER}" and data["allocations"][9] is not None


# --------------------------------------------------------------------------
# release


def test_release_semantics(store, ipam):
    add_pool(store, POOL)
    a, b, c = (ipam.auto_assign_one(4, HOST) for _ in range(3))
    block = ci.block_cidr_for(a)
    none = ipaddress.ip_address("10.10.0.200")
    assert ipam.release_ips([b, none]) == {none}              # not allocated: returned
    data = block_json(store, block)
    assert data["allocations"][:3] == [0, None, 0]
    assert data["unallocated"][-1] == 1                         # reused last
    assert ipam.release_ips([b]) == {b}
    # release of everything: the block keeps its affinity and stays
    _, counts = counted(store, ipam.release_ips, [a, c])
    assert counts == budget(1, 1, 0)
    data = block_json(store, block)
    assert data["allocations"] == [None] * 64 and data["attributes"] == []
    assert sorted(data["unallocated"]) == list(range(64))
    assert ipam.auto_assign_one(4, HOST) == block.network_address + 3


def test_empty_block_without_affinity_is_deleted(store, ipam):
    add_pool(store, POOL)
    a = ipam.auto_assign_one(4, HOST)
    b = ipam.auto_assign_one(4, HOST)
    block = ci.block_cidr_for(a)
    data = block_json(store, block)
    data["affinity"] = ""           # affinity released (e.g. by calicoctl pool remove)
    store.inner.put(ci.block_key(block), json.dumps(data))
    ipam.release_ips([a])
    assert block_json(store, block)["allocations"][1] == 0     # not empty: stays
    _, counts = counted(store, ipam.release_ips, [b])
    assert counts == budget(1, 0, 1)
    with pytest.raises(KeyNotFound):
        store.inner.get(ci.block_key(block))
    assert ipam.release_ips([b]) == {b}                        # block gone: 1R, no-op


def test_release_drops_orphaned_attributes_and_renumbers(store, ipam):
    add_pool(store, POOL)
    a = ipam.auto_assign_one(4, HOST, handle_id="h1")
    b = ipam.auto_assign_one(4, HOST, handle_id="h2")
    c = ipam.auto_assign_one(4, HOST, handle_id="h3")
    block = ci.block_cidr_for(a)
    assert block_json(store, block)["allocations"][:3] == [0, 1, 2]
    ipam.release_ips([b])
    data = block_json(store, block)
    assert data["allocations"][:3] == [0, None, 1]
    assert [x["handle_id"] for x in data["attributes"]] == ["h1", "h3"]
    assert ipam.release_ips([a, c]) == set()


# --------------------------------------------------------------------------
# handles


def test_handles_count_references(store, ipam):
    add_pool(store, POOL)
    key = ci.handle_key("ep1")
    a = ipam.auto_assign_one(4, HOST, handle_id="ep1")
    block = str(ci.block_cidr_for(a))
    assert json.loads(store.inner.get(key).value) == {"id": "ep1", "block": {block: 1}}
    b = ipam.auto_assign_one(4, HOST, handle_id="ep1")
    s = ipam.assign_ip("10.10.0.250", HOST, handle_id="ep1")
    s_block = str(ci.block_cidr_for(s))
    assert json.loads(store.inner.get(key).value) == {
        "id": "ep1", "block": {block: 2, s_block: 1}}
    # attributes are shared by equal (handle, secondary) pairs
    assert block_json(store, block)["attributes"] == [{"handle_id": "ep1", "secondary": None}]
    assert sorted(ipam.addresses_of_handle("ep1")) == sorted([a, b, s])
    ipam.release_ips([a])
    assert json.loads(store.inner.get(key).value)["block"] == {block: 1, s_block: 1}
    assert sorted(ipam.release_by_handle("ep1")) == sorted([b, s])
    with pytest.raises(KeyNotFound):
        store.inner.get(key)                                   # empty handle deleted
    assert ipam.release_by_handle("ep1") == []
    assert ipam.addresses_of_handle("ep1") == []


class FirstBlockCasFails(CountingDatastore):
    """The first block write loses a race: another writer bumps the version."""

    def __init__(self, inner):
        super().__init__(inner)
        self.failed = False

    def compare_and_swap(self, key, value, version):
        if "/assignment/" in key and not self.failed:
            self.failed = True
            self.inner.put(key, self.inner.get(key).value)   # bump the version
        return super().compare_and_swap(key, value, version)


def test_failed_block_write_gives_the_handle_count_back(store):
    add_pool(store, POOL)
    racing = FirstBlockCasFails(store.inner)
    ipam = CalicoIpam(racing)
    ip = ipam.auto_assign_one(4, HOST, handle_id="h")
    assert racing.failed
    assert json.loads(store.inner.get(ci.handle_key("h")).value)["block"] == {
        str(ci.block_cidr_for(ip)): 1}


# --------------------------------------------------------------------------
# concurrent requests of one process: one block write per batch


def _concurrently(count, call):
    """``call(i)`` for i in range(count), all threads released at once."""
    results, errors = [None] * count, []
    go = threading.Barrier(count)

    def run(i):
        go.wait()
        try:
            results[i] = call(i)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def _handles_match_blocks(store, ipam, handle_ids):
    """Every handle counts its one address in the block that holds it."""
    by_handle = {}
    for block in ipam.list_blocks(4).values():
        for ip in block.allocated():
            by_handle.setdefault(block.attributes_of(ip)["handle_id"], []).append(ip)
    for h in handle_ids:
        (ip,) = by_handle[h]
        assert json.loads(store.inner.get(ci.handle_key(h)).value)["block"] == {
            str(ci.block_cidr_for(ip)): 1}
    assert set(by_handle) == set(handle_ids)


@pytest.mark.parametrize("count", [24, 90])
def test_concurrent_fresh_requests_share_block_writes(store, ipam, count):
    """24 requests fit the host's block: fewer block writes than requests,
    no address twice, every handle right.  90 overflow it: the rest claim
    the next block through the full path."""
    add_pool(store, POOL)
    ipam.release_ips([ipam.auto_assign_one(4, HOST)])          # the host's block exists
    store.reset()
    handles = [f"netplugin.t{i}" for i in range(count)]
    ips, errors = _concurrently(count, lambda i: ipam.auto_assign_one(
        4, HOST, handle_id=handles[i], fresh_handle=True))
    assert errors == []
    assert len(set(ips)) == count
    block_writes = [k for kind, op, k in store.log if kind == "W" and "/assignment/" in k]
    assert len(block_writes) < count
    _handles_match_blocks(store, ipam, handles)
    blocks = ipam.list_blocks(4)
    assert len(blocks) == (1 if count <= 64 else 2)
    assert all(b.host == HOST for b in blocks.values())
    for h in handles:
        assert len(ipam.release_by_handle(h)) == 1
    assert all(b.empty for b in ipam.list_blocks(4).values())


def test_batch_lost_cas_gives_every_handle_back(store):
    """The batch's block write loses a race: the handles it counted are
    given back and the retry counts each once."""
    add_pool(store, POOL)
    CalicoIpam(store).release_ips([CalicoIpam(store).auto_assign_one(4, HOST)])
    racing = FirstBlockCasFails(store.inner)
    ipam = CalicoIpam(racing)
    handles = [f"netplugin.c{i}" for i in range(12)]
    ips, errors = _concurrently(12, lambda i: ipam.auto_assign_one(
        4, HOST, handle_id=handles[i], fresh_handle=True))
    assert racing.failed and errors == [] and len(set(ips)) == 12
    _handles_match_blocks(store, ipam, handles)


def test_batch_failure_reaches_every_waiter_and_the_next_batch_runs(store):
    """The datastore fails under a batch: every request of it gets the error
    (no address, no hang); the next requests are served."""
    add_pool(store, POOL)

    class Flaky(CountingDatastore):
        fail = True

        def compare_and_swap(self, key, value, version):
            if "/assignment/" in key and Flaky.fail:
                time.sleep(0.2)                  # let the others queue up
                raise DatastoreUnavailable("etcd at test is unreachable")
            return super().compare_and_swap(key, value, version)

    CalicoIpam(store).release_ips([CalicoIpam(store).auto_assign_one(4, HOST)])
    ipam = CalicoIpam(Flaky(store.inner))
    ips, errors = _concurrently(8, lambda i: ipam.auto_assign_one(
        4, HOST, handle_id=f"netplugin.f{i}", fresh_handle=True))
    assert len(errors) == 8 and all("unreachable" in str(e) for e in errors)
    Flaky.fail = False
    ips, errors = _concurrently(8, lambda i: ipam.auto_assign_one(
        4, HOST, handle_id=f"netplugin.g{i}", fresh_handle=True))
    assert errors == [] and len(set(ips)) == 8


# --------------------------------------------------------------------------
# the IpamDriver calls


def test_capabilities_and_address_spaces(backend):
    assert backend.ipam_capabilities().to_json() == {"RequiresMACAddress": False,
                                                     "RequiresRequestReplay": False}
    assert backend.get_default_address_spaces().to_json() == {
        "LocalDefaultAddressSpace": "CalicoLocalAddressSpace",
        "GlobalDefaultAddressSpace": "CalicoGlobalAddressSpace"}


def test_request_pool_without_subnet(store, backend):
    resp, counts = counted(store, backend.request_pool, pool_req())
    assert resp.to_json() == {"PoolID": "CalicoPoolIPv4", "Pool": "0.0.0.0/0",
                              "Data": {"com.docker.network.gateway": "0.0.0.0/0"}}
    assert counts == budget(0, 0, 0)
    resp = backend.request_pool(pool_req(v6=True))
    assert resp.to_json() == {"PoolID": "CalicoPoolIPv6", "Pool": "100::/64",
                              "Data": {"com.docker.network.gateway": "::/0"}}


def test_ipv6_pool_answer_cannot_overlap_a_nameserver_or_calico_pool():
    """dockerd re-asks for ever when the answer holds an IPv6 nameserver of
    /etc/resolv.conf; 100::/64 is the discard-only prefix (RFC 6666)."""
    answer = ipaddress.ip_network(drv.ANY_POOL[6])
    for ns in ("::1", "fe80::1", "fd00::53", "2001:4860:4860::8888", "2001:db8::53",
               "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"):
        assert ipaddress.ip_address(ns) not in answer
    for pool in (POOL6, "fd00::/8", "2000::/3", "fe80::/10", "::/96"):
        assert not answer.overlaps(ipaddress.ip_network(pool))


def test_request_pool_with_subnet(store, backend):
    add_pool(store, "192.168.0.0/16")
    add_pool(store, POOL6)
    for subnet in ("192.168.0.0/16", "192.168.7.0/24", "192.168.7.16/28"):
        resp, counts = counted(store, backend.request_pool, pool_req(subnet))
        assert resp.to_json() == {"PoolID": subnet, "Pool": subnet,
                                  "Data": {"com.docker.network.gateway": "0.0.0.0/0"}}
        assert counts == budget(1, 0, 0)
    resp = backend.request_pool(pool_req("fd80:24e2:f998:72d6::/80", v6=True))
    assert resp.to_json() == {"PoolID": "fd80:24e2:f998:72d6::/80",
                              "Pool": "fd80:24e2:f998:72d6::/80",
                              "Data": {"com.docker.network.gateway": "::/0"}}


def test_request_pool_with_subnet_outside_the_pools(store, backend):
    add_pool(store, "192.168.0.0/16")
    add_pool(store, "10.1.0.0/24", ipam=False)
    add_pool(store, "10.2.0.0/16", disabled=True)
    for subnet in ("10.9.0.0/24", "10.1.0.0/24", "10.2.1.0/24", "192.0.0.0/8"):
        with pytest.raises(NotFound) as exc:
            backend.request_pool(pool_req(subnet))
        assert str(exc.value) == (
            f"subnet {subnet} is not inside an enabled Calico IPAM pool; existing IPv4 "
            f"pools: 10.1.0.0/24 (ipam disabled), 10.2.0.0/16 (disabled), 192.168.0.0/16; "
            f"use --subnet with one of them (or a subnet inside one), or add a pool with "
            f"calicoctl")
    with pytest.raises(NotFound, match="there are no Calico IPv6 pools"):
        backend.request_pool(pool_req("fd00::/64", v6=True))


def test_request_pool_refuses_ip_range_and_unknown_options(store, backend):
    add_pool(store, "192.168.0.0/16")
    with pytest.raises(NotSupported, match=r"--ip-range \(192.168.1.0/25\) is not supported"):
        backend.request_pool(pool_req("192.168.0.0/16", sub_pool="192.168.1.0/25"))
    with pytest.raises(InvalidRequest) as exc:
        backend.request_pool(pool_req(options={"color": "blue", "pool": "192.168.0.0/16"}))
    assert "unknown IPAM option 'color' for the calico IPAM driver; known options: pool" \
        in str(exc.value)
    with pytest.raises(InvalidRequest, match="is not a CIDR"):
        backend.request_pool(pool_req(options={"pool": "banana"}))
    with pytest.raises(InvalidRequest, match="more than one IPv4 pool"):
        backend.request_pool(pool_req(options={"pool": "10.0.0.0/8,192.168.0.0/16"}))


def test_request_pool_with_pool_option(store, backend):
    add_pool(store, "192.168.0.0/16")
    add_pool(store, "10.0.0.0/16")
    add_pool(store, POOL6)
    opts = {"pool": f"10.0.0.0/16,{POOL6}"}
    resp, counts = counted(store, backend.request_pool, pool_req(options=opts))
    # the PoolID pins the pool; the Pool is still the marker dockerd never checks
    assert resp.to_json() == {"PoolID": "10.0.0.0/16", "Pool": "0.0.0.0/0",
                              "Data": {"com.docker.network.gateway": "0.0.0.0/0"}}
    assert counts == budget(1, 0, 0)
    resp = backend.request_pool(pool_req(v6=True, options=opts))
    assert resp.to_json() == {"PoolID": POOL6, "Pool": "100::/64",
                              "Data": {"com.docker.network.gateway": "::/0"}}
    # a v4-only option leaves the v6 pool free
    resp = backend.request_pool(pool_req(v6=True, options={"pool": "10.0.0.0/16"}))
    assert resp.pool_id == "CalicoPoolIPv6"
    with pytest.raises(NotFound, match=r"pool=172.16.0.0/16 is not an enabled Calico IPAM"):
        backend.request_pool(pool_req(options={"pool": "172.16.0.0/16"}))
    # with --subnet too: the subnet must lie in the chosen pool
    assert backend.request_pool(pool_req("10.0.5.0/24", options=opts)).pool_id == "10.0.5.0/24"
    with pytest.raises(InvalidRequest, match="not inside the pool 10.0.0.0/16"):
        backend.request_pool(pool_req("192.168.5.0/24", options=opts))


def test_release_pool_is_a_no_op(store, backend):
    _, counts = counted(store, backend.release_pool, p.ReleasePoolRequest("CalicoPoolIPv4"))
    assert counts == budget(0, 0, 0)


def test_gateway_request_answers_the_marker_without_ipam(store, backend):
    for pool_id, marker in (("CalicoPoolIPv4", "0.0.0.0/0"), ("CalicoPoolIPv6", "::/0"),
                            ("10.10.0.0/24", "0.0.0.0/0")):
        resp, counts = counted(store, backend.request_address, addr_req(pool_id, gateway=True))
        assert resp.to_json() == {"Address": marker, "Data": {}}
        assert counts == budget(0, 0, 0)
    resp = backend.request_address(addr_req("10.10.0.0/24", "10.10.0.1", gateway=True))
    assert resp.address == "0.0.0.0/0"
    assert dump(store) == {}


def test_request_address_auto(store, backend):
    add_pool(store, POOL)
    add_pool(store, POOL6)
    resp = backend.request_address(addr_req("CalicoPoolIPv4"))
    ip = ipaddress.ip_interface(resp.address)
    assert resp.address.endswith("/32") and ip.ip in ipaddress.ip_network(POOL)
    _, counts = counted(store, backend.request_address, addr_req("CalicoPoolIPv4"))
    assert counts == budget(1, 2, 0)          # the block the first used; 1W: the handle key
    resp6 = backend.request_address(addr_req("CalicoPoolIPv6"))
    assert resp6.address.endswith("/128")
    assert ipaddress.ip_interface(resp6.address).ip in ipaddress.ip_network(POOL6)
    # the endpoint's host (config) owns the block
    block = ci.block_cidr_for(ip.ip)
    assert block_json(store, block)["affinity"] == f"host:{HOST}"


def test_request_address_in_a_subnet_pinned_network(store, backend):
    add_pool(store, "192.168.0.0/16")
    pool_id = backend.request_pool(pool_req("192.168.7.16/28")).pool_id
    subnet = ipaddress.ip_network("192.168.7.16/28")
    got = [ipaddress.ip_interface(backend.request_address(addr_req(pool_id)).address).ip
           for _ in range(16)]
    assert sorted(got) == list(subnet)                    # only the /28, all of it
    with pytest.raises(ci.PoolExhausted) as exc:
        backend.request_address(addr_req(pool_id))
    assert str(exc.value) == "no free address in pool(s) 192.168.0.0/16 (subnet 192.168.7.16/28)"
    # the rest of the block stays usable by unpinned networks
    other = ipaddress.ip_interface(backend.request_address(addr_req("CalicoPoolIPv4")).address)
    assert other.ip in ipaddress.ip_network("192.168.7.0/26") and other.ip not in subnet


def test_request_address_with_pool_option_uses_that_pool(store, backend):
    add_pool(store, "192.168.0.0/16")
    add_pool(store, "10.0.0.0/16")
    pool_id = backend.request_pool(pool_req(options={"pool": "10.0.0.0/16"})).pool_id
    for _ in range(3):
        ip = ipaddress.ip_interface(backend.request_address(addr_req(pool_id)).address).ip
        assert ip in ipaddress.ip_network("10.0.0.0/16")


def test_request_specific_address(store, backend):
    add_pool(store, "192.168.0.0/16")
    pool_id = backend.request_pool(pool_req("192.168.7.0/24")).pool_id
    resp = backend.request_address(addr_req(pool_id, "192.168.7.9"))
    assert resp.to_json() == {"Address": "192.168.7.9/32", "Data": {}}
    data = block_json(store, "192.168.7.0/26")
    [attr] = data["attributes"]
    assert attr["secondary"] == {} and attr["handle_id"].startswith("netplugin.192.168.7.0-24.req-")
    with pytest.raises(ci.AddressInUse) as exc:
        backend.request_address(addr_req(pool_id, "192.168.7.9"))
    assert str(exc.value) == "address 192.168.7.9 is already in use"
    with pytest.raises(ci.AddressNotInPool) as exc:
        backend.request_address(addr_req(pool_id, "192.168.8.1"))
    assert str(exc.value) == "address 192.168.8.1 is outside the network's subnet 192.168.7.0/24"
    with pytest.raises(ci.AddressNotInPool, match="not in any enabled Calico IPAM pool"):
        backend.request_address(addr_req("CalicoPoolIPv4", "172.16.0.1"))
    with pytest.raises(InvalidRequest, match="not an IPv4 address"):
        backend.request_address(addr_req(pool_id, "fd00::1"))


def test_unknown_pool_id(backend):
    for bad in ("CalicoPoolIPv5", "10.0.0.1/24", "10.0.0.1", ""):
        with pytest.raises(InvalidRequest):
            backend.request_address(p.RequestAddressRequest(bad, "", {}))


def test_release_address(store, backend):
    add_pool(store, POOL)
    ip = ipaddress.ip_interface(backend.request_address(addr_req("CalicoPoolIPv4")).address).ip
    for marker in ("0.0.0.0", "::"):                      # dockerd's gateway release
        _, counts = counted(store, backend.release_address,
                            p.ReleaseAddressRequest("CalicoPoolIPv4", marker))
        assert counts == budget(0, 0, 0)
    _, counts = counted(store, backend.release_address,
                        p.ReleaseAddressRequest("CalicoPoolIPv4", str(ip)))
    assert counts == budget(2, 1, 1)          # the block; the handle read and deleted
    assert block_json(store, ci.block_cidr_for(ip))["allocations"] == [None] * 64
    assert not [k for k in dump(store) if "/handle/" in k]
    # not allocated (twice, or never): an Err, nothing changes
    before = dump(store)
    with pytest.raises(drv.NotAllocated, match="is not allocated"):
        backend.release_address(p.ReleaseAddressRequest("CalicoPoolIPv4", str(ip)))
    with pytest.raises(drv.NotAllocated):
        backend.release_address(p.ReleaseAddressRequest("CalicoPoolIPv4", "172.16.9.9"))
    assert dump(store) == before


def test_docker_call_sequence_through_the_app(store, backend):
    """What dockerd sends for `network create --ipv6` + `run` + `rm` + `network rm`."""
    add_pool(store, POOL)
    add_pool(store, POOL6)
    client = create_app(backend, "local").test_client()

    def post(path, body=None):
        r = client.post(path, data=json.dumps(body) if body is not None else b"")
        return r.status_code, json.loads(r.data)

    assert post("/Plugin.Activate")[1] == {"Implements": ["NetworkDriver", "IpamDriver"]}
    assert post("/IpamDriver.GetCapabilities")[1]["RequiresMACAddress"] is False
    nets = {}
    for v6 in (False, True):
        status, pool = post("/IpamDriver.RequestPool",
                            {"AddressSpace": "CalicoLocalAddressSpace", "Pool": "",
                             "SubPool": "", "Options": {}, "V6": v6})
        assert status == 200
        nets[v6] = pool
    nid = "a" * 64
    status, _ = post("/NetworkDriver.CreateNetwork", {
        "NetworkID": nid,
        "Options": {"com.docker.network.enable_ipv6": True,
                    "com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "CalicoLocalAddressSpace", "Pool": nets[False]["Pool"],
                      "Gateway": nets[False]["Data"]["com.docker.network.gateway"]}],
        "IPv6Data": [{"AddressSpace": "CalicoLocalAddressSpace", "Pool": nets[True]["Pool"],
                      "Gateway": nets[True]["Data"]["com.docker.network.gateway"]}]})
    assert status == 200
    status, a4 = post("/IpamDriver.RequestAddress",
                      {"PoolID": nets[False]["PoolID"], "Address": "", "Options": None})
    assert status == 200 and a4["Address"].endswith("/32")
    status, a6 = post("/IpamDriver.RequestAddress",
                      {"PoolID": nets[True]["PoolID"], "Address": "", "Options": None})
    assert status == 200 and a6["Address"].endswith("/128")
    eid = "e" * 64
    status, _ = post("/NetworkDriver.CreateEndpoint", {
        "NetworkID": nid, "EndpointID": eid,
        "Interface": {"Address": a4["Address"], "AddressIPv6": a6["Address"]}})
    assert status == 200
    assert post("/NetworkDriver.DeleteEndpoint", {"NetworkID": nid, "EndpointID": eid})[0] \
        == 200
    for a in (a4, a6):
        ip = a["Address"].split("/")[0]
        assert post("/IpamDriver.ReleaseAddress",
                    {"PoolID": "x", "Address": ip})[0] == 500        # no such PoolID
    for a, pid in ((a4, nets[False]["PoolID"]), (a6, nets[True]["PoolID"])):
        ip = a["Address"].split("/")[0]
        assert post("/IpamDriver.ReleaseAddress",
                    {"PoolID": pid, "Address": ip})[0] == 200
    for pid, gw in ((nets[False]["PoolID"], "0.0.0.0"), (nets[True]["PoolID"], "::")):
        assert post("/IpamDriver.ReleaseAddress", {"PoolID": pid, "Address": gw})[0] == 200
        assert post("/IpamDriver.ReleasePool", {"PoolID": pid})[0] == 200
    assert post("/NetworkDriver.DeleteNetwork", {"NetworkID": nid})[0] == 200
    # nothing of the network is left; the blocks stay with the host's affinity
    left = dump(store)
    assert not [k for k in left if nid in k or eid in k]
    blocks = {k: v for k, v in left.items() if "/assignment/" in k}
    assert len(blocks) == 2 and all(b["allocations"] == [None] * 64 for b in blocks.values())
    # errors reach Docker in "Error" (IPAM side)
    status, body = post("/IpamDriver.RequestPool",
                        {"Pool": "", "SubPool": "10.0.0.0/24", "Options": {}, "V6": False})
    assert status == 500 and "--ip-range" in body["Error"]


def test_errors_are_plugin_errors():
    for cls in (ci.PoolExhausted, ci.NoPools, ci.AddressNotInPool, ci.NoHostAffinity,
                ci.CorruptData, ci.TooMuchContention):
        assert issubclass(cls, PluginError)
    assert issubclass(ci.AddressInUse, Conflict)


# --------------------------------------------------------------------------
# contention: 200 concurrent RequestAddress from 4 processes on one etcd


def _contention_worker(url, host, count, threads, pool_id, out, go_release):
    """Runs in a spawned process: ``count`` RequestAddress calls over
    ``threads`` threads, report, wait, then release them all."""
    try:
        from netplugin.config import config_from_text as cft
        from netplugin.datastore.etcd import EtcdDatastore as Etcd
        from backends.calico.driver import CalicoBackend as Backend
        from netplugin import protocol as proto

        store = Etcd([url])
        backend = Backend(cft(f'backend = "calico"\n[calico]\nhostname = "{host}"\n'), store)
        got, errors, lock = [], [], threading.Lock()

        def run(n):
            for _ in range(n):
                try:
                    resp = backend.request_address(proto.RequestAddressRequest(pool_id, "", {}))
                    with lock:
                        got.append(resp.address)
                except Exception as exc:  # reported, the test fails on it
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")

        per = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
        workers = [threading.Thread(target=run, args=(n,)) for n in per]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        out.put(("allocated", host, got, errors))
        if not go_release.wait(60):
            return
        rel_errors = []

        def release(addresses):
            for a in addresses:
                try:
                    ip = a.split("/")[0]
                    if backend.ipam.release_ips([ip]):
                        rel_errors.append(f"{ip} was not allocated")
                except Exception as exc:
                    rel_errors.append(f"{type(exc).__name__}: {exc}")

        halves = [got[i::threads] for i in range(threads)]
        workers = [threading.Thread(target=release, args=(h,)) for h in halves]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        out.put(("released", host, [], rel_errors))
    except BaseException:
        out.put(("crashed", host, [], [traceback.format_exc()]))


def _contend(url, hosts, pool_id, check_allocated, per_process=50, threads=2):
    """Allocate in every process, ``check_allocated(results)`` while all is
    allocated, then release in every process."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    go = ctx.Event()
    procs = [ctx.Process(target=_contention_worker,
                         args=(url, host, per_process, threads, pool_id, out, go))
             for host in hosts]
    for proc in procs:
        proc.start()
    try:
        allocated = [out.get(timeout=90) for _ in procs]
        results = {"allocated": allocated}
        check_allocated(allocated)
        go.set()
        results["released"] = [out.get(timeout=90) for _ in procs]
        return results
    finally:
        go.set()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


@pytest.mark.parametrize("hosts,pool", [
    (["host-a"] * 4, "10.60.0.0/22"),                   # one host, 4 processes
    (["host-a", "host-b", "host-a", "host-b"], "10.70.0.0/24"),   # 2 hosts, 256 addresses
])
def test_contention_200_concurrent_request_address(etcd_url, hosts, pool):
    """4 processes x 2 threads, 50 RequestAddress each.  With two hosts the
    pool has 4 blocks and a third host already owns one (empty): 192 addresses
    of their own for 200 requests, so the hosts also borrow under contention."""
    store = EtcdDatastore([etcd_url])
    store.delete_prefix("/calico")
    owners_ok = set(hosts)
    try:
        store.put(keys.pool(pool), json.dumps({"cidr": pool}))
        ipam = CalicoIpam(store)
        if len(set(hosts)) > 1:
            ipam.release_ips([ipam.auto_assign_one(4, "host-c")])
            owners_ok.add("host-c")

        def check_allocated(allocated):
            assert all(kind == "allocated" for kind, *_ in allocated), allocated
            errors = [e for _, _, _, errs in allocated for e in errs]
            assert errors == []
            addresses = [a for _, _, got, _ in allocated for a in got]
            assert len(addresses) == 200
            assert len(set(addresses)) == 200, "an address was handed out twice"
            net = ipaddress.ip_network(pool)
            assert all(a.endswith("/32") and ipaddress.ip_interface(a).ip in net
                       for a in addresses)
            # the datastore agrees: exactly these 200 are allocated
            blocks = ipam.list_blocks(4)
            stored = sorted(a for b in blocks.values() for a in b.allocated())
            assert stored == sorted(ipaddress.ip_interface(a).ip for a in addresses)
            for cidr, block in blocks.items():
                assert block.host in owners_ok
                # every block is claimed by exactly one host and its key says so
                owners = [h for h in owners_ok if cidr in ipam.affine_blocks(h, 4)]
                assert owners == [block.host]
                assert len(block.unallocated) + len(block.allocated()) == 64
            if len(set(hosts)) == 1:
                assert len(blocks) == 4                    # 200 addresses: 4 blocks, no waste
            else:
                assert len(blocks) == 4
                borrowed = [b for b in blocks.values() if b.host == "host-c"]
                assert len(borrowed) == 1 and len(borrowed[0].allocated()) >= 8

        started = time.monotonic()
        results = _contend(etcd_url, hosts, "CalicoPoolIPv4", check_allocated)
        elapsed = time.monotonic() - started
        # every release found its address; nothing is left allocated
        assert all(kind == "released" for kind, *_ in results["released"]), results
        rel_errors = [e for _, _, _, errs in results["released"] for e in errs]
        assert rel_errors == []
        blocks = ipam.list_blocks(4)
        assert blocks and all(b.empty for b in blocks.values())
        assert elapsed < 60, f"contention test took {elapsed:.1f} s"
    finally:
        store.delete_prefix("/calico")
        store.close()
