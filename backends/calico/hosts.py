"""Removed Calico hosts: the tombstones of ``netpluginctl host remove NAME``
and the sweep of what such a host left behind (affinities, blocks, bird_ip).

A host that is gone for good keeps its block affinities
(``/calico/ipam/v2/host/<h>/ipv4/block/<cidr>``): every other host routes
those blocks to it (routes.py), a blackhole.  ``host remove`` records the
decision as a tombstone ``/calico/libnetwork/removed-hosts/<h>`` (plugin-
private, outside the Calico v1 layout), deletes the host's ``bird_ip`` and
sweeps; every host's agent sweeps the tombstoned hosts again on each run
(an affinity written late by the dying host, a sweep cut short), with the
same two-look, version-checked rule as the leak audit.  A host whose agent
starts again deletes its own tombstone: it is back.

Sweeping one block of a removed host: its affinity is cleared (CAS), the
addresses no workload record of any host refers to (and no IPIP tunnel
address) are released, an empty block is deleted, and the affinity key goes.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set

from netplugin.datastore import KeyNotFound
from netplugin.datastore.base import CompareFailed

from backends.calico import ipam as ci
from backends.calico import model

log = logging.getLogger(__name__)

REMOVED_ROOT = model.REMOVED_ROOT
removed_key = model.removed_key
bird_ip_key = model.bird_ip_key

IPAddress = model.IPAddress


def removed_hosts(store) -> Dict[str, float]:
    """``{host: removed_at (epoch seconds)}`` of every tombstone."""
    out: Dict[str, float] = {}
    for item in store.list_prefix(REMOVED_ROOT):
        name = item.key.rsplit("/", 1)[-1]
        try:
            at = float(json.loads(item.value).get("removed_at", 0))
        except (ValueError, AttributeError, TypeError):
            at = 0.0
        out[name] = at
    return out


def mark_removed(store, host: str) -> None:
    store.put(removed_key(host), json.dumps({"removed_at": time.time()}))


def forget_removal(store, host: str) -> bool:
    """Delete ``host``'s tombstone (it is back); True if there was one."""
    try:
        store.delete(removed_key(host))
    except KeyNotFound:
        return False
    return True


@dataclass
class HostLeftovers:
    """One look at what a removed host left: affinity keys and blocks (with
    the versions seen) and every address still referenced anywhere."""
    host: str
    affinities: Dict[str, int] = field(default_factory=dict)     # key -> version
    blocks: Dict[object, model.Block] = field(default_factory=dict)  # cidr -> block
    bird_ip: Optional[int] = None                                # version

    def empty(self) -> bool:
        return not (self.affinities or self.blocks or self.bird_ip is not None)


def look(store, host: str) -> HostLeftovers:
    out = HostLeftovers(host)
    ipam = ci.CalicoIpam(store)
    cidrs = set()
    for version in (4, 6):
        for item in store.list_prefix(model.host_affinity_dir(host, version)):
            out.affinities[item.key] = item.version
            try:
                cidrs.add(model.cidr_from_key(item.key))
            except ValueError:
                pass
        for cidr, block in ipam.list_blocks(version).items():
            if block.host == host:
                cidrs.add(cidr)
    for cidr in cidrs:
        try:
            block = ipam.read_block(cidr)
        except (KeyNotFound, model.CorruptData):
            continue
        if block.host == host:
            out.blocks[block.cidr] = block
    try:
        out.bird_ip = store.get(bird_ip_key(host)).version
    except KeyNotFound:
        pass
    return out


def confirmed(first: HostLeftovers, second: HostLeftovers) -> HostLeftovers:
    """What both looks saw, unchanged (same versions): safe to sweep."""
    out = HostLeftovers(first.host)
    out.affinities = {k: v for k, v in second.affinities.items()
                      if first.affinities.get(k) == v}
    out.blocks = {c: b for c, b in first.blocks.items()
                  if c in second.blocks and second.blocks[c].version == b.version}
    if first.bird_ip is not None and first.bird_ip == second.bird_ip:
        out.bird_ip = first.bird_ip
    return out


def referenced_addresses(store) -> Set[IPAddress]:
    """Addresses of every workload record (any host, any orchestrator) and
    every IPIP tunnel address.  ValueError if a workload record is corrupt
    (it may refer to any address: release nothing)."""
    out: Set[IPAddress] = set()
    for item in store.list_prefix(model.HOST_ROOT):
        if model.is_endpoint_key(item.key):
            try:
                out.update(model.Endpoint.from_json(item.key, item.value).ip_addresses())
            except (ValueError, TypeError) as exc:
                raise ValueError(f"workload record {item.key} is corrupt ({exc})") from None
        elif model.tunnel_address_host(item.key) is not None:
            try:
                out.add(ipaddress.ip_address(item.value.strip()))
            except ValueError:
                pass
    return out


def sweep(store, leftovers: HostLeftovers, referenced: Iterable[IPAddress],
          step: Callable[[], None] = lambda: None) -> Dict[str, List[str]]:
    """Remove what ``leftovers`` lists, each item only at the version seen
    (compare-and-swap / compare-and-delete): what changed since is kept for
    the next look.  ``step`` is called after each block and each affinity
    (progress).  Returns what was done."""
    referenced = set(referenced)
    done: Dict[str, List[str]] = {"affinities_removed": [], "blocks_deleted": [],
                                  "blocks_released": [], "addresses_released": [],
                                  "kept": []}
    host = leftovers.host
    for cidr, block in sorted(leftovers.blocks.items(), key=lambda kv: (kv[0].version, kv[0])):
        step()
        free = [block.address(o) for o, index in enumerate(block.allocations)
                if index is not None and block.address(o) not in referenced]
        _, handles = block.release(free)
        block.affinity = None
        try:
            if block.empty:
                store.delete(block.key, block.version)
                done["blocks_deleted"].append(str(cidr))
            else:
                store.compare_and_swap(block.key, block.to_json(), block.version)
                done["blocks_released"].append(str(cidr))
        except (CompareFailed, KeyNotFound):
            done["kept"].append(f"block {cidr} changed since it was looked at; kept")
            continue
        ci.CalicoIpam(store).uncount(cidr, handles)
        done["addresses_released"] += [str(a) for a in free]
        log.info("removed host %s: released block %s (%d address(es) freed%s)", host, cidr,
                 len(free), ", block deleted" if block.empty else "")
    for key, version in sorted(leftovers.affinities.items()):
        step()
        try:
            store.delete(key, version)
        except KeyNotFound:
            continue
        except CompareFailed:
            done["kept"].append(f"affinity {key} changed since it was looked at; kept")
            continue
        done["affinities_removed"].append(key)
        log.info("removed host %s: deleted block affinity %s", host, key)
    if leftovers.bird_ip is not None:
        try:
            store.delete(bird_ip_key(host), leftovers.bird_ip)
            log.info("removed host %s: deleted its bird_ip", host)
        except (KeyNotFound, CompareFailed):
            pass
    return done


def endpoint_records(store, host: str) -> List[str]:
    """Keys of ``host``'s workload endpoint records (any orchestrator)."""
    return [item.key for item in store.list_prefix(model.host_workloads(host) + "/")
            if model.is_endpoint_key(item.key)]
