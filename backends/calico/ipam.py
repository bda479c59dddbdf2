"""Calico IPAM v2 (libcalico ``ipam.py``/``block.py``/``handle.py``) on our Datastore.

Data layout (etcd v2 keys, JSON values), shared with calicoctl and the Calico
libnetwork plugins:

- pools ``/calico/v1/ipam/v{4,6}/pool/<cidr-dash>``: ``{"cidr", "ipam", "disabled",
  ...}``; missing ``ipam``/``disabled`` mean true/false.  Only pools with
  ``ipam`` true and ``disabled`` false hand out addresses ("enabled" pools).
- blocks ``/calico/ipam/v2/assignment/ipv{4,6}/block/<cidr-dash>``: 64 addresses
  (/26, /122), JSON in libcalico's shape (``cidr``, ``affinity`` "host:<h>",
  ``strict_affinity``, ``allocations`` [64], ``unallocated``, ``attributes``).
- host affinity ``/calico/ipam/v2/host/<h>/ipv{4,6}/block/<cidr-dash>`` = ``""``.
- handles ``/calico/ipam/v2/handle/<id>`` = ``{"id", "block": {cidr: count}}``.
- config ``/calico/ipam/v2/config`` (absent = auto_allocate_blocks true,
  strict_affinity false).

Every change of a block or handle is read-modify-compare-and-swap on the
item's version (etcd modifiedIndex) with at most ``RETRIES`` attempts; new
blocks are created only if absent.  Reads are quorum reads (the etcd adapter
does that for every read).

Auto-assign of one address from a block with room costs 2R 1W: the list of
the host's affine blocks, the block, the CAS write.  Claiming a new block adds
the config and pool reads, a read per candidate block (a single listing of
all blocks once ``WALK_READS`` candidates were taken) and 2W (affinity key,
block): 4R 3W on a fresh pool.

One deliberate difference from libcalico: a candidate block that exists and
already has affinity to this host (claimed by another process of the host
after our affine list was read) is allocated from instead of skipped, so
concurrent requests of one host do not claim more blocks than they fill.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

from netplugin.datastore import CompareFailed, Datastore, KeyExists, KeyNotFound
from netplugin.errors import Conflict, NotFound, PluginError

from backends.calico.keys import cidr_in_key, pool_dir

log = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

BLOCK_SIZE_BITS = 6
BLOCK_SIZE = 2 ** BLOCK_SIZE_BITS              # 64 addresses per block
BLOCK_PREFIXLEN = {4: 32 - BLOCK_SIZE_BITS,    # /26
                   6: 128 - BLOCK_SIZE_BITS}   # /122
RETRIES = 100            # compare-and-swap attempts (libcalico RETRIES)
KEY_ERROR_RETRIES = 3    # re-queues of a listed affine block that does not exist
CLAIM_RETRIES = 100      # block claims per auto-assign
WALK_READS = 8           # candidate reads before listing every block instead

IPAM_ROOT = "/calico/ipam/v2"
CONFIG_KEY = f"{IPAM_ROOT}/config"
HANDLE_ROOT = f"{IPAM_ROOT}/handle"
HOST_ROOT = f"{IPAM_ROOT}/host"
BLOCK_ROOT = f"{IPAM_ROOT}/assignment"


# --------------------------------------------------------------------------
# errors (user-facing messages)


class IpamError(PluginError):
    """Base of the Calico IPAM errors."""


class PoolExhausted(IpamError, Conflict):
    """No free address in the pools the request may use."""


class NoPools(IpamError, NotFound):
    """No enabled Calico IPAM pool (of the wanted version / for the network)."""


class AddressInUse(IpamError, Conflict):
    def __init__(self, address):
        super().__init__(f"address {address} is already in use")
        self.address = address


class AddressNotInPool(IpamError, NotFound):
    """A specific address outside every enabled Calico IPAM pool."""


class NoHostAffinity(IpamError, Conflict):
    """strict_affinity forbids using another host's block."""


class CorruptData(IpamError):
    """A block, handle or pool value in the datastore cannot be understood."""


class TooMuchContention(IpamError):
    """Compare-and-swap kept failing RETRIES times."""


# --------------------------------------------------------------------------
# keys and small helpers


def cidr_from_key(key: str) -> IPNetwork:
    """Last path component ``192.168.0.0-26`` / ``fd80::40-122`` -> network."""
    name = key.rstrip("/").rsplit("/", 1)[-1]
    addr, _, plen = name.rpartition("-")
    return ipaddress.ip_network(f"{addr}/{plen}")


def block_dir(version: int) -> str:
    return f"{BLOCK_ROOT}/ipv{version}/block/"


def block_key(cidr) -> str:
    net = ipaddress.ip_network(cidr)
    return f"{block_dir(net.version)}{cidr_in_key(net)}"


def host_affinity_dir(host: str, version: int) -> str:
    return f"{HOST_ROOT}/{host}/ipv{version}/block/"


def host_affinity_key(host: str, cidr) -> str:
    net = ipaddress.ip_network(cidr)
    return f"{host_affinity_dir(host, net.version)}{cidr_in_key(net)}"


def handle_key(handle_id: str) -> str:
    return f"{HANDLE_ROOT}/{handle_id}"


def block_cidr_for(address) -> IPNetwork:
    """The block (/26 or /122) an address belongs to."""
    ip = ipaddress.ip_address(address)
    return ipaddress.ip_network(f"{ip}/{BLOCK_PREFIXLEN[ip.version]}", strict=False)


def _fnv1a_32(text: str) -> int:
    h = 0x811C9DC5
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def _truthy(value: Any, default: bool) -> bool:
    """JSON booleans, tolerating the strings Go/hand-written values may hold."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0", ""):
            return False
    if isinstance(value, (int, float)):
        return bool(value)
    return default


def _backoff(attempt: int) -> None:
    """A short random pause after a lost compare-and-swap (spreads contenders)."""
    if attempt >= 1:
        time.sleep(random.random() * min(0.0005 * 2 ** min(attempt, 7), 0.05))


def _overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)


def describe(nets: Iterable) -> str:
    return ", ".join(str(n) for n in nets) or "(none)"


# --------------------------------------------------------------------------
# pools and config


@dataclass(frozen=True)
class Pool:
    cidr: IPNetwork
    ipam: bool = True
    disabled: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def version(self) -> int:
        return self.cidr.version

    @property
    def enabled(self) -> bool:
        """Hands out addresses: ``ipam`` true, not disabled, room for a block."""
        return (self.ipam and not self.disabled
                and self.cidr.prefixlen <= BLOCK_PREFIXLEN[self.version])

    def state(self) -> str:
        if not self.ipam:
            return "ipam disabled"
        if self.disabled:
            return "disabled"
        if self.cidr.prefixlen > BLOCK_PREFIXLEN[self.version]:
            return f"smaller than a /{BLOCK_PREFIXLEN[self.version]} block"
        return "enabled"

    @classmethod
    def parse(cls, key: str, value: str, version: int) -> Optional["Pool"]:
        """A pool from its datastore item, or None (with a warning) if unusable.
        Missing fields take libcalico's defaults; Go's extra fields are ignored."""
        try:
            data = json.loads(value) if value else {}
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            text = data.get("cidr")
            cidr = (ipaddress.ip_network(text, strict=False) if isinstance(text, str) and text
                    else cidr_from_key(key))
            if cidr.version != version:
                raise ValueError(f"IPv{cidr.version} CIDR under the IPv{version} pools")
        except ValueError as exc:
            log.warning("ignoring Calico pool %s: %s", key, exc)
            return None
        return cls(cidr, ipam=_truthy(data.get("ipam"), True),
                   disabled=_truthy(data.get("disabled"), False), raw=data)


@dataclass(frozen=True)
class IpamConfig:
    auto_allocate_blocks: bool = True
    strict_affinity: bool = False

    @classmethod
    def parse(cls, value: str) -> "IpamConfig":
        """Absent key (or ``{}``) = defaults.  libcalico-go writes the fields with
        ``omitempty``, so a missing field next to a present one means false."""
        try:
            data = json.loads(value) if value else {}
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            log.warning("ignoring corrupt %s (%s): using defaults", CONFIG_KEY, exc)
            return cls()
        names = ("auto_allocate_blocks", "strict_affinity")
        if not any(n in data for n in names):
            return cls()
        return cls(auto_allocate_blocks=_truthy(data.get("auto_allocate_blocks"), False),
                   strict_affinity=_truthy(data.get("strict_affinity"), False))


# --------------------------------------------------------------------------
# blocks


_BLOCK_FIELDS = ("cidr", "affinity", "strict_affinity", "allocations", "unallocated",
                 "attributes")


class Block:
    """One allocation block as stored; ``version`` is the item's version
    (None for a block not written yet)."""

    def __init__(self, cidr: IPNetwork, affinity: Optional[str] = None,
                 strict_affinity: bool = False):
        assert cidr.prefixlen == BLOCK_PREFIXLEN[cidr.version], cidr
        self.cidr = cidr
        self.affinity = affinity              # "host:<h>", "" or None
        self.strict_affinity = strict_affinity
        self.allocations: List[Optional[int]] = [None] * BLOCK_SIZE
        self.unallocated: List[int] = list(range(BLOCK_SIZE))
        self.attributes: List[Dict[str, Any]] = []
        self.extra: Dict[str, Any] = {}       # fields of other writers, kept as they are
        self.version: Optional[int] = None

    # -- JSON ----------------------------------------------------------------
    @classmethod
    def from_item(cls, key: str, value: str, version: int) -> "Block":
        try:
            data = json.loads(value)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            cidr = ipaddress.ip_network(data.get("cidr") or cidr_from_key(key))
            if cidr.prefixlen != BLOCK_PREFIXLEN[cidr.version]:
                raise ValueError(f"{cidr} is not a /{BLOCK_PREFIXLEN[cidr.version]} block")
            affinity = data.get("affinity")
            if not affinity and data.get("hostAffinity"):   # old Go field
                affinity = f"host:{data['hostAffinity']}"
            if affinity is not None and not isinstance(affinity, str):
                raise ValueError(f"affinity {affinity!r} is not a string")
            strict = data.get("strict_affinity", data.get("strictAffinity"))
            block = cls(cidr, affinity, _truthy(strict, False))
            attributes = data.get("attributes") or []
            if not isinstance(attributes, list) or not all(isinstance(a, dict)
                                                            for a in attributes):
                raise ValueError("attributes is not a list of objects")
            allocations = data.get("allocations")
            if not isinstance(allocations, list) or len(allocations) != BLOCK_SIZE:
                raise ValueError(f"allocations is not a list of {BLOCK_SIZE} entries")
            for a in allocations:
                if a is not None and (isinstance(a, bool) or not isinstance(a, int)
                                      or not 0 <= a < len(attributes)):
                    raise ValueError(f"allocation {a!r} names no attribute")
            unallocated = data.get("unallocated")
            if unallocated is not None and not (
                    isinstance(unallocated, list)
                    and all(isinstance(o, int) and not isinstance(o, bool) for o in unallocated)):
                raise ValueError("unallocated is not a list of ordinals")
        except (ValueError, TypeError) as exc:
            raise CorruptData(f"Calico IPAM block {key} is corrupt: {exc}") from None
        block.allocations = list(allocations)
        block.attributes = [dict(a) for a in attributes]
        # free ordinals in the stored order, then any the list forgot (ascending)
        seen: Set[int] = set()
        order: List[int] = []
        for o in unallocated or []:
            if 0 <= o < BLOCK_SIZE and allocations[o] is None and o not in seen:
                seen.add(o)
                order.append(o)
        order += [o for o in range(BLOCK_SIZE) if allocations[o] is None and o not in seen]
        block.unallocated = order
        block.extra = {k: v for k, v in data.items() if k not in _BLOCK_FIELDS}
        block.version = version
        return block

    def to_json(self) -> str:
        data: Dict[str, Any] = {
            "cidr": str(self.cidr),
            "affinity": self.affinity,
            "strict_affinity": self.strict_affinity,
            "allocations": self.allocations,
            "unallocated": self.unallocated,
            "attributes": self.attributes,
        }
        for k, v in self.extra.items():
            data.setdefault(k, v)
        if "strictAffinity" in data:
            data["strictAffinity"] = self.strict_affinity
        return json.dumps(data)

    # -- queries -------------------------------------------------------------
    @property
    def key(self) -> str:
        return block_key(self.cidr)

    @property
    def host(self) -> Optional[str]:
        """The host this block has affinity to, or None."""
        if self.affinity and self.affinity.startswith("host:"):
            return self.affinity[5:]
        return None

    @property
    def empty(self) -> bool:
        return all(a is None for a in self.allocations)

    def address(self, ordinal: int) -> IPAddress:
        return self.cidr.network_address + ordinal

    def ordinal(self, address: IPAddress) -> int:
        o = int(address) - int(self.cidr.network_address)
        assert 0 <= o < BLOCK_SIZE, (address, self.cidr)
        return o

    def free_ordinals(self, within: Optional[IPNetwork] = None) -> List[int]:
        if within is None:
            return list(self.unallocated)
        return [o for o in self.unallocated if self.address(o) in within]

    def allocated(self) -> List[IPAddress]:
        return [self.address(o) for o, a in enumerate(self.allocations) if a is not None]

    # -- changes -------------------------------------------------------------
    def _attr_index(self, handle_id: Optional[str], secondary: Any) -> int:
        wanted = {"handle_id": handle_id, "secondary": secondary}
        for i, attr in enumerate(self.attributes):
            if attr.get("handle_id") == handle_id and attr.get("secondary") == secondary:
                return i
        self.attributes.append(wanted)
        return len(self.attributes) - 1

    def auto_assign(self, num: int, handle_id: Optional[str], secondary: Any,
                    within: Optional[IPNetwork] = None) -> List[IPAddress]:
        """Take up to ``num`` free addresses, in ``unallocated`` order (from the front)."""
        ordinals = self.free_ordinals(within)[:num]
        if not ordinals:
            return []
        index = self._attr_index(handle_id, secondary)
        taken = set(ordinals)
        for o in ordinals:
            self.allocations[o] = index
        self.unallocated = [o for o in self.unallocated if o not in taken]
        return [self.address(o) for o in ordinals]

    def assign(self, address: IPAddress, handle_id: Optional[str], secondary: Any) -> None:
        o = self.ordinal(address)
        if self.allocations[o] is not None:
            raise AddressInUse(address)
        self.allocations[o] = self._attr_index(handle_id, secondary)
        self.unallocated = [u for u in self.unallocated if u != o]

    def release(self, addresses: Iterable[IPAddress]
                ) -> Tuple[Set[IPAddress], Dict[Optional[str], int]]:
        """Free ``addresses``; return (those that were not allocated, {handle: count})."""
        not_allocated: Set[IPAddress] = set()
        handles: Dict[Optional[str], int] = {}
        freed: List[int] = []
        for address in sorted(set(addresses)):
            o = self.ordinal(address)
            index = self.allocations[o]
            if index is None:
                not_allocated.add(address)
                continue
            handle = self.attributes[index].get("handle_id")
            handles[handle] = handles.get(handle, 0) + 1
            self.allocations[o] = None
            freed.append(o)
        self.unallocated += freed          # freed addresses are reused last
        self._drop_orphaned_attributes()
        return not_allocated, handles

    def release_handle(self, handle_id: str) -> List[IPAddress]:
        indexes = {i for i, a in enumerate(self.attributes) if a.get("handle_id") == handle_id}
        ordinals = [o for o, a in enumerate(self.allocations) if a in indexes]
        for o in ordinals:
            self.allocations[o] = None
        self.unallocated += ordinals
        self._drop_orphaned_attributes()
        return [self.address(o) for o in ordinals]

    def _drop_orphaned_attributes(self) -> None:
        used = sorted({a for a in self.allocations if a is not None})
        if len(used) == len(self.attributes):
            return
        renumber = {old: new for new, old in enumerate(used)}
        self.attributes = [self.attributes[old] for old in used]
        self.allocations = [None if a is None else renumber[a] for a in self.allocations]


# --------------------------------------------------------------------------
# handles


class Handle:
    def __init__(self, handle_id: str):
        self.handle_id = handle_id
        self.block: Dict[str, int] = {}
        self.extra: Dict[str, Any] = {}
        self.version: Optional[int] = None

    @classmethod
    def from_item(cls, handle_id: str, value: str, version: int) -> "Handle":
        try:
            data = json.loads(value)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            blocks = data.get("block") or {}
            if not isinstance(blocks, dict) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in blocks.values()):
                raise ValueError("block is not an object of counts")
        except ValueError as exc:
            raise CorruptData(f"Calico IPAM handle {handle_key(handle_id)} is corrupt: "
                              f"{exc}") from None
        handle = cls(handle_id)
        handle.block = dict(blocks)
        handle.extra = {k: v for k, v in data.items() if k not in ("id", "block")}
        handle.version = version
        return handle

    def to_json(self) -> str:
        data = {"id": self.handle_id, "block": self.block}
        data.update(self.extra)
        return json.dumps(data)

    @property
    def empty(self) -> bool:
        return not any(self.block.values())

    def increment(self, cidr, amount: int) -> None:
        self.block[str(cidr)] = self.block.get(str(cidr), 0) + amount

    def decrement(self, cidr, amount: int) -> None:
        current = self.block.get(str(cidr), 0)
        if current < amount:
            log.warning("handle %s counts %d address(es) in block %s, releasing %d",
                        self.handle_id, current, cidr, amount)
        left = current - amount
        if left > 0:
            self.block[str(cidr)] = left
        else:
            self.block.pop(str(cidr), None)


# --------------------------------------------------------------------------
# the IPAM client


class CalicoIpam:
    """Calico IPAM v2 on a ``Datastore``; safe for concurrent use by any number
    of threads, processes and hosts (all coordination is in the datastore)."""

    def __init__(self, datastore: Datastore, retries: int = RETRIES):
        self.datastore = datastore
        self.retries = retries

    # -- pools and config ----------------------------------------------------
    def pools(self, version: int) -> List[Pool]:
        """Every Calico pool of ``version`` (enabled or not), by CIDR.  1R."""
        found = []
        for item in self.datastore.list_prefix(pool_dir(version)):
            if item.key.count("/") != pool_dir(version).count("/"):
                continue   # something deeper than a pool key
            pool = Pool.parse(item.key, item.value, version)
            if pool is not None:
                found.append(pool)
        found.sort(key=lambda p: (int(p.cidr.network_address), p.cidr.prefixlen))
        return found

    def enabled_pools(self, version: int) -> List[Pool]:
        return [p for p in self.pools(version) if p.enabled]

    def config(self) -> IpamConfig:
        """``/calico/ipam/v2/config`` (absent = defaults).  1R."""
        try:
            return IpamConfig.parse(self.datastore.get(CONFIG_KEY).value)
        except KeyNotFound:
            return IpamConfig()

    # -- block and handle I/O ----------------------------------------------------
    def read_block(self, cidr) -> Block:
        """The stored block; KeyNotFound if absent."""
        item = self.datastore.get(block_key(cidr))
        return Block.from_item(item.key, item.value, item.version)

    def _write_block(self, block: Block) -> None:
        """CAS the block on its version (CompareFailed if it changed)."""
        item = self.datastore.compare_and_swap(block.key, block.to_json(), block.version)
        block.version = item.version

    def affine_blocks(self, host: str, version: int,
                      within: Optional[IPNetwork] = None) -> List[IPNetwork]:
        """Blocks ``host`` claims affinity to (overlapping ``within``).  1R."""
        cidrs = []
        for item in self.datastore.list_prefix(host_affinity_dir(host, version)):
            try:
                cidr = cidr_from_key(item.key)
            except ValueError:
                log.warning("ignoring malformed host affinity key %s", item.key)
                continue
            if cidr.version != version:
                continue
            if within is None or _overlaps(cidr, within):
                cidrs.append(cidr)
        return cidrs

    def list_blocks(self, version: int) -> Dict[IPNetwork, Block]:
        """Every block of ``version`` (corrupt ones left out).  1R."""
        blocks = {}
        for item in self.datastore.list_prefix(block_dir(version)):
            try:
                block = Block.from_item(item.key, item.value, item.version)
            except CorruptData as exc:
                log.warning("%s", exc)
                continue
            blocks[block.cidr] = block
        return blocks

    def read_handle(self, handle_id: str) -> Handle:
        item = self.datastore.get(handle_key(handle_id))
        return Handle.from_item(handle_id, item.value, item.version)

    def _change_handle(self, handle_id: str, cidr, amount: int) -> None:
        """Add ``amount`` (may be negative) to the handle's count for ``cidr``;
        an empty handle is deleted.  Read-modify-CAS with retries."""
        for attempt in range(self.retries):
            _backoff(attempt)
            try:
                handle = self.read_handle(handle_id)
            except KeyNotFound:
                if amount < 0:
                    log.warning("handle %s does not exist; cannot release %d address(es) "
                                "of block %s from it", handle_id, -amount, cidr)
                    return
                handle = Handle(handle_id)
            if amount >= 0:
                handle.increment(cidr, amount)
            else:
                handle.decrement(cidr, -amount)
            try:
                if handle.version is None:
                    self.datastore.create(handle_key(handle_id), handle.to_json())
                elif handle.empty:
                    self.datastore.delete(handle_key(handle_id), handle.version)
                else:
                    self.datastore.compare_and_swap(handle_key(handle_id), handle.to_json(),
                                                    handle.version)
                return
            except (CompareFailed, KeyExists):
                continue
            except KeyNotFound:     # deleted under us: re-read
                continue
        raise TooMuchContention(
            f"could not update Calico IPAM handle {handle_id}: it changed concurrently "
            f"{self.retries} times in a row")

    # -- claiming ------------------------------------------------------------------
    def _claim(self, host: str, cidr: IPNetwork, strict: bool) -> Optional[Block]:
        """Claim the (absent) block ``cidr`` for ``host``: write the affinity key,
        create the block if absent.  Returns the block (ours, possibly created
        by another process of this host) or None when another host owns it."""
        affinity_key = host_affinity_key(host, cidr)
        self.datastore.put(affinity_key, "")
        block = Block(cidr, f"host:{host}", strict)
        try:
            item = self.datastore.create(block.key, block.to_json())
            block.version = item.version
            log.info("claimed Calico IPAM block %s for host %s", cidr, host)
            return block
        except KeyExists:
            pass
        try:
            existing = self.read_block(cidr)
        except KeyNotFound:
            existing = None    # created and deleted meanwhile: treat as lost
        if existing is not None and existing.host == host:
            return existing    # another process on this host won the race
        try:
            self.datastore.delete(affinity_key)
        except KeyNotFound:
            pass               # another process of this host cleaned up already
        log.debug("block %s was claimed by %s first", cidr,
                  existing.affinity if existing else "someone")
        return None

    # -- allocation from one block -----------------------------------------------
    def _assign_from_block(self, block: Block, num: int, handle_id: Optional[str],
                           secondary: Any, within: Optional[IPNetwork],
                           host: Optional[str]) -> List[IPAddress]:
        """Take up to ``num`` addresses from ``block`` (already read), re-reading
        after each lost CAS.  With ``host`` the block must have affinity to it
        (else nothing is taken).  KeyNotFound if the block vanishes."""
        for attempt in range(self.retries):
            if attempt:
                _backoff(attempt)
                block = self.read_block(block.cidr)
            if host is not None and block.host != host:
                log.warning("block %s is listed for host %s but has affinity %r; skipping",
                            block.cidr, host, block.affinity)
                return []
            ips = block.auto_assign(num, handle_id, secondary, within)
            if not ips:
                return []
            if handle_id is not None:
                self._change_handle(handle_id, block.cidr, len(ips))
            try:
                self._write_block(block)
            except CompareFailed:
                if handle_id is not None:
                    self._change_handle(handle_id, block.cidr, -len(ips))
                continue
            return ips
        raise TooMuchContention(
            f"could not allocate from Calico IPAM block {block.cidr}: it changed "
            f"concurrently {self.retries} times in a row")

    # -- auto-assign -------------------------------------------------------------------
    def auto_assign(self, version: int, num: int, host: str,
                    within: Optional[IPNetwork] = None, handle_id: Optional[str] = None,
                    secondary: Any = None) -> List[IPAddress]:
        """Up to ``num`` addresses of ``version`` for ``host`` (fewer when the
        pools are exhausted), from enabled pools, only inside ``within`` if
        given.  libcalico's order: the host's affine blocks, then new blocks
        claimed for the host, then (unless strict affinity) other blocks."""
        if within is not None and within.version != version:
            raise ValueError(f"{within} is not an IPv{version} network")
        found: List[IPAddress] = []

        # 1. affine blocks
        affine = self.affine_blocks(host, version, within)
        queue = deque(affine)
        key_errors = 0
        existing: Set[IPNetwork] = set()     # affine blocks that exist (tried)
        while queue and len(found) < num:
            cidr = queue.popleft()
            try:
                block = self.read_block(cidr)
                existing.add(cidr)
                found += self._assign_from_block(block, num - len(found), handle_id,
                                                 secondary, within, host)
            except KeyNotFound:
                # another process of this host may be creating it right now
                key_errors += 1
                if key_errors <= KEY_ERROR_RETRIES:
                    queue.append(cidr)
            except CorruptData as exc:
                existing.add(cidr)
                log.warning("%s; skipping it", exc)
        if len(found) >= num:
            return found

        # 2. claim new blocks
        config = self.config()
        pools = self._usable_pools(version, within)
        known: Optional[Dict[IPNetwork, Block]] = None   # listing of every block
        if config.auto_allocate_blocks:
            skip = set(existing)    # a listed block that does not exist is a candidate
            reads = claims = 0
            for cidr in self._candidates(pools, host, within):
                if len(found) >= num or claims >= CLAIM_RETRIES:
                    break
                if cidr in skip:
                    continue
                if known is None and reads >= WALK_READS:
                    known = self.list_blocks(version)
                existing_block: Optional[Block] = None
                if known is not None:
                    existing_block = known.get(cidr)
                    exists = cidr in known
                else:
                    reads += 1
                    try:
                        existing_block = self.read_block(cidr)
                        exists = True
                    except KeyNotFound:
                        exists = False
                    except CorruptData as exc:
                        log.warning("%s; skipping it", exc)
                        exists = True
                if exists:
                    skip.add(cidr)
                    # Claimed by another process of this host since our list
                    # of affine blocks: use it rather than claim one more.
                    if existing_block is not None and existing_block.host == host \
                            and existing_block.free_ordinals(within):
                        affine.append(cidr)
                        try:
                            found += self._assign_from_block(
                                existing_block, num - len(found), handle_id, secondary,
                                within, host)
                        except KeyNotFound:
                            pass
                    continue
                claims += 1
                block = self._claim(host, cidr, config.strict_affinity)
                skip.add(cidr)
                if block is None:
                    continue
                affine.append(cidr)
                try:
                    found += self._assign_from_block(block, num - len(found), handle_id,
                                                     secondary, within, host)
                except KeyNotFound:
                    continue
            if len(found) >= num:
                return found

        # 3. borrow from other blocks
        if config.strict_affinity or not pools:
            return found
        if known is None:
            known = self.list_blocks(version)
        tried = set(affine)
        others = [b for c, b in known.items()
                  if c not in tried and any(c.subnet_of(p.cidr) for p in pools)
                  and (within is None or _overlaps(c, within))
                  and not (b.strict_affinity and b.host not in (None, host))
                  and b.free_ordinals(within)]
        random.shuffle(others)
        for block in others:
            if len(found) >= num:
                break
            try:
                found += self._assign_from_block(block, num - len(found), handle_id,
                                                 secondary, within, None)
            except KeyNotFound:
                continue
        return found

    def _usable_pools(self, version: int, within: Optional[IPNetwork]) -> List[Pool]:
        pools = self.enabled_pools(version)
        if within is not None:
            pools = [p for p in pools if _overlaps(p.cidr, within)]
        return pools

    @staticmethod
    def _candidates(pools: Sequence[Pool], host: str,
                    within: Optional[IPNetwork]) -> Iterator[IPNetwork]:
        """Block CIDRs of the pools (inside ``within``), pools in order, each
        walked from a start chosen by the host name with wrap-around: requests
        of one host aim at the same block, different hosts at different ones."""
        seed = _fnv1a_32(host)
        for pool in pools:
            region = pool.cidr
            if within is not None:
                if within.subnet_of(region):
                    region = within
                elif not region.subnet_of(within):
                    continue
            plen = BLOCK_PREFIXLEN[region.version]
            if region.prefixlen >= plen:
                yield block_cidr_for(region.network_address)
                continue
            count = 2 ** (plen - region.prefixlen)
            start = random.Random(seed).randrange(count)
            base = int(region.network_address)
            cls = type(region)
            for i in range(count):
                n = (start + i) % count
                yield cls((base + n * BLOCK_SIZE, plen))

    def auto_assign_one(self, version: int, host: str, within: Optional[IPNetwork] = None,
                        handle_id: Optional[str] = None, secondary: Any = None) -> IPAddress:
        """One address, or PoolExhausted / NoPools with a message for the user."""
        ips = self.auto_assign(version, 1, host, within, handle_id, secondary)
        if ips:
            return ips[0]
        pools = self._usable_pools(version, within)
        if not pools:
            if within is not None:
                raise NoPools(f"the network's subnet {within} is no longer inside an enabled "
                              f"Calico IPv{version} IPAM pool; re-create its pool "
                              f"(calicoctl pool add <cidr>)")
            raise NoPools(f"there is no enabled Calico IPv{version} IPAM pool; create one "
                          f"(calicoctl pool add <cidr>)")
        where = describe(p.cidr for p in pools)
        if within is not None and not any(p.cidr == within for p in pools):
            where = f"{where} (subnet {within})"
        raise PoolExhausted(f"no free address in pool(s) {where}")

    # -- assign a specific address --------------------------------------------------
    def assign_ip(self, address, host: str, handle_id: Optional[str] = None,
                  secondary: Any = None) -> IPAddress:
        """Allocate exactly ``address``: AddressInUse if taken, AddressNotInPool
        if no block holds it and no enabled pool contains it, NoHostAffinity if
        its block is another host's with strict affinity."""
        ip = ipaddress.ip_address(address)
        cidr = block_cidr_for(ip)
        config: Optional[IpamConfig] = None
        for attempt in range(self.retries):
            _backoff(attempt)
            try:
                block = self.read_block(cidr)
            except KeyNotFound:
                pools = self.enabled_pools(ip.version)
                if not any(ip in p.cidr for p in pools):
                    raise AddressNotInPool(
                        f"address {ip} is not in any enabled Calico IPAM pool "
                        f"(IPv{ip.version} pools: {describe(p.cidr for p in pools)})") from None
                if config is None:
                    config = self.config()
                self._claim(host, cidr, config.strict_affinity)
                continue
            if block.strict_affinity and block.host not in (None, host):
                raise NoHostAffinity(
                    f"address {ip} is in block {cidr} of host {block.host}, which has "
                    f"strict affinity: host {host} cannot use it")
            block.assign(ip, handle_id, secondary)
            if handle_id is not None:
                self._change_handle(handle_id, cidr, 1)
            try:
                self._write_block(block)
                return ip
            except CompareFailed:
                if handle_id is not None:
                    self._change_handle(handle_id, cidr, -1)
        raise TooMuchContention(
            f"could not assign {ip}: Calico IPAM block {cidr} changed concurrently "
            f"{self.retries} times in a row")

    # -- release ----------------------------------------------------------------------
    def release_ips(self, addresses: Iterable) -> Set[IPAddress]:
        """Free the addresses; return those that were not allocated."""
        by_block: Dict[IPNetwork, Set[IPAddress]] = {}
        for a in addresses:
            ip = ipaddress.ip_address(a)
            by_block.setdefault(block_cidr_for(ip), set()).add(ip)
        not_allocated: Set[IPAddress] = set()
        for cidr, ips in sorted(by_block.items(), key=lambda kv: (kv[0].version, kv[0])):
            not_allocated |= self._release_from_block(cidr, ips)
        return not_allocated

    def _release_from_block(self, cidr: IPNetwork, ips: Set[IPAddress]) -> Set[IPAddress]:
        for attempt in range(self.retries):
            _backoff(attempt)
            try:
                block = self.read_block(cidr)
            except KeyNotFound:
                return set(ips)
            not_allocated, handles = block.release(ips)
            if len(not_allocated) == len(ips):
                return not_allocated
            try:
                self._store_after_release(block)
            except (CompareFailed, KeyNotFound):
                continue
            for handle_id, count in handles.items():
                if handle_id is not None:
                    self._change_handle(handle_id, cidr, -count)
            return not_allocated
        raise TooMuchContention(
            f"could not release addresses of Calico IPAM block {cidr}: it changed "
            f"concurrently {self.retries} times in a row")

    def _store_after_release(self, block: Block) -> None:
        """CAS-delete an empty block without affinity, else CAS-update it."""
        if block.empty and block.host is None:
            self.datastore.delete(block.key, block.version)
            log.info("deleted empty Calico IPAM block %s (no affinity)", block.cidr)
        else:
            self._write_block(block)

    # -- handles ------------------------------------------------------------------------
    def addresses_of_handle(self, handle_id: str) -> List[IPAddress]:
        try:
            handle = self.read_handle(handle_id)
        except KeyNotFound:
            return []
        found: List[IPAddress] = []
        for cidr in handle.block:
            try:
                block = self.read_block(ipaddress.ip_network(cidr))
            except KeyNotFound:
                continue
            for o, index in enumerate(block.allocations):
                if index is not None and \
                        block.attributes[index].get("handle_id") == handle_id:
                    found.append(block.address(o))
        return found

    def release_by_handle(self, handle_id: str) -> List[IPAddress]:
        """Free every address allocated with ``handle_id``; return them."""
        try:
            handle = self.read_handle(handle_id)
        except KeyNotFound:
            return []
        released: List[IPAddress] = []
        for cidr_text in list(handle.block):
            cidr = ipaddress.ip_network(cidr_text)
            for attempt in range(self.retries):
                _backoff(attempt)
                try:
                    block = self.read_block(cidr)
                except KeyNotFound:
                    ips: List[IPAddress] = []
                    break
                ips = block.release_handle(handle_id)
                if not ips:
                    break
                try:
                    self._store_after_release(block)
                except (CompareFailed, KeyNotFound):
                    continue
                break
            else:
                raise TooMuchContention(
                    f"could not release handle {handle_id} in block {cidr}: it changed "
                    f"concurrently {self.retries} times in a row")
            released += ips
            # a block that no longer holds any of the handle's addresses drops
            # out of the handle whatever it counted
            self._change_handle(handle_id, cidr, -(len(ips) or handle.block[cidr_text]))
        return released
