"""Calico IPAM v2 records: Pool, IpamConfig, Block (with its allocation
operations) and Handle, their JSON and keys, and the IPAM data errors.
"""
from __future__ import annotations

import ipaddress
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from netplugin.errors import Conflict, PluginError

from backends.calico.model.common import (IPAM_CONFIG_KEY, CorruptRecord, IPAddress,
                                          IPNetwork, block_key, cidr_from_key, handle_key,
                                          pool, truthy)

log = logging.getLogger(__name__)

# IPAM: pools, config, blocks, handles

BLOCK_SIZE_BITS = 6
BLOCK_SIZE = 2 ** BLOCK_SIZE_BITS              # 64 addresses per block
BLOCK_PREFIXLEN = {4: 32 - BLOCK_SIZE_BITS,    # /26
                   6: 128 - BLOCK_SIZE_BITS}   # /122


def block_cidr_for(address) -> IPNetwork:
    """The block (/26 or /122) an address belongs to."""
    ip = ipaddress.ip_address(address)
    return ipaddress.ip_network(f"{ip}/{BLOCK_PREFIXLEN[ip.version]}", strict=False)


class IpamError(PluginError):
    """Base of the Calico IPAM errors."""


class CorruptData(IpamError):
    """A block, handle or pool value in the datastore cannot be understood."""


class AddressInUse(IpamError, Conflict):
    def __init__(self, address):
        super().__init__(f"address {address} is already in use")
        self.address = address


@dataclass(frozen=True)
class Pool:
    """``/calico/v1/ipam/v{4,6}/pool/<cidr-dash>``: ``{"cidr", "ipam",
    "disabled", ...}``; missing ``ipam``/``disabled`` mean true/false.  Only
    pools with ``ipam`` true and ``disabled`` false hand out addresses
    ("enabled" pools).  ``raw`` keeps the stored fields (Go's extra ones)."""
    cidr: IPNetwork
    ipam: bool = True
    disabled: bool = False
    raw: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def version(self) -> int:
        return self.cidr.version

    @property
    def key(self) -> str:
        return pool(self.cidr)

    @property
    def written_for_docker_ipam(self) -> bool:
        """Stored with ``ipam`` the JSON boolean false, as a Docker-IPAM
        network writes its pool."""
        return self.raw.get("ipam") is False

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
    def docker_ipam(cls, cidr: str, ipip: bool, masquerade: bool) -> "Pool":
        """The pool of a Docker-IPAM network, as libcalico's ``IPPool.to_json``
        writes it (``ipam`` false; no IPIP on IPv6, which calicoctl refuses)."""
        net = ipaddress.ip_network(cidr, strict=False)
        raw: Dict[str, Any] = {"cidr": cidr}
        if ipip and net.version == 4:
            raw["ipip"] = "tunl0"
        if masquerade:
            raw["masquerade"] = True
        raw["ipam"] = False
        return cls(net, ipam=False, raw=raw)

    def to_json(self) -> str:
        data = dict(self.raw)
        data.setdefault("cidr", str(self.cidr))
        if "ipam" in data or not self.ipam:
            data["ipam"] = self.ipam
        if "disabled" in data or self.disabled:
            data["disabled"] = self.disabled
        return json.dumps(data)

    @classmethod
    def from_json(cls, key: str, value: str, version: Optional[int] = None) -> "Pool":
        """The pool of a datastore item; CorruptRecord if unusable.  Missing
        fields take libcalico's defaults; Go's extra fields are kept in raw."""
        try:
            data = json.loads(value) if value else {}
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            text = data.get("cidr")
            cidr = (ipaddress.ip_network(text, strict=False) if isinstance(text, str) and text
                    else cidr_from_key(key))
            if version is not None and cidr.version != version:
                raise ValueError(f"IPv{cidr.version} CIDR under the IPv{version} pools")
        except ValueError as exc:
            raise CorruptRecord(str(exc)) from None
        return cls(cidr, ipam=truthy(data.get("ipam"), True),
                   disabled=truthy(data.get("disabled"), False), raw=data)

    @classmethod
    def parse(cls, key: str, value: str, version: int) -> Optional["Pool"]:
        """``from_json``, or None (with a warning) if unusable."""
        try:
            return cls.from_json(key, value, version)
        except CorruptRecord as exc:
            log.warning("ignoring Calico pool %s: %s", key, exc)
            return None


@dataclass(frozen=True)
class IpamConfig:
    """``/calico/ipam/v2/config`` (absent = auto_allocate_blocks true,
    strict_affinity false)."""
    auto_allocate_blocks: bool = True
    strict_affinity: bool = False

    key = IPAM_CONFIG_KEY

    @classmethod
    def parse(cls, value: str) -> "IpamConfig":
        """Absent key (or ``{}``) = defaults.  libcalico-go writes the fields with
        ``omitempty``, so a missing field next to a present one means false."""
        try:
            data = json.loads(value) if value else {}
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            log.warning("ignoring corrupt %s (%s): using defaults", IPAM_CONFIG_KEY, exc)
            return cls()
        names = ("auto_allocate_blocks", "strict_affinity")
        if not any(n in data for n in names):
            return cls()
        return cls(auto_allocate_blocks=truthy(data.get("auto_allocate_blocks"), False),
                   strict_affinity=truthy(data.get("strict_affinity"), False))

    from_json = parse

    def to_json(self) -> str:
        return json.dumps({"auto_allocate_blocks": self.auto_allocate_blocks,
                           "strict_affinity": self.strict_affinity})


_BLOCK_FIELDS = ("cidr", "affinity", "strict_affinity", "allocations", "unallocated",
                 "attributes")


class Block:
    """One allocation block ``/calico/ipam/v2/assignment/ipv{4,6}/block/
    <cidr-dash>``: 64 addresses (/26, /122) in libcalico's JSON (``cidr``,
    ``affinity`` "host:<h>", ``strict_affinity``, ``allocations`` [64],
    ``unallocated``, ``attributes``); ``version`` is the item's version (None
    for a block not written yet)."""

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
    def from_json(cls, key: str, value: str, version: Optional[int] = None) -> "Block":
        """CorruptData (naming the key) if the value cannot be understood."""
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
            block = cls(cidr, affinity, truthy(strict, False))
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

    from_item = from_json

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

    def attributes_of(self, address: IPAddress) -> Optional[Dict[str, Any]]:
        """The attributes (handle_id, secondary) of an allocated address, or None."""
        index = self.allocations[self.ordinal(address)]
        return None if index is None else self.attributes[index]

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

    def release(self, addresses: Iterable[IPAddress],
                keep: Optional[Callable[[Dict[str, Any]], bool]] = None
                ) -> Tuple[Set[IPAddress], Dict[Optional[str], int]]:
        """Free ``addresses`` (but those whose attributes ``keep`` accepts);
        return (those that were not allocated, {handle: count})."""
        not_allocated: Set[IPAddress] = set()
        handles: Dict[Optional[str], int] = {}
        freed: List[int] = []
        for address in sorted(set(addresses)):
            o = self.ordinal(address)
            index = self.allocations[o]
            if index is None:
                not_allocated.add(address)
                continue
            if keep is not None and keep(self.attributes[index]):
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


class Handle:
    """``/calico/ipam/v2/handle/<id>`` = ``{"id", "block": {cidr: count}}``."""

    def __init__(self, handle_id: str):
        self.handle_id = handle_id
        self.block: Dict[str, int] = {}
        self.extra: Dict[str, Any] = {}
        self.version: Optional[int] = None

    @property
    def key(self) -> str:
        return handle_key(self.handle_id)

    @classmethod
    def from_json(cls, handle_id: str, value: str, version: Optional[int] = None
                  ) -> "Handle":
        """CorruptData (naming the key) if the value cannot be understood."""
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

    from_item = from_json

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


#: Calico IPAM handles of the addresses our IPAM driver allocates:
#: ``netplugin.<pool tag>.<owner>`` (see backends.calico.ipam_driver).
IPAM_HANDLE_PREFIX = "netplugin."


def is_our_ipam_handle(handle_id) -> bool:
    """An allocation handle our IPAM driver wrote (the audit may release it)."""
    return isinstance(handle_id, str) and handle_id.startswith(IPAM_HANDLE_PREFIX)
