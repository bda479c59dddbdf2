"""Calico IPAM v2 on our Datastore: claiming blocks, assigning and releasing
addresses and handles (libcalico's ``ipam.py``); the records are ``model``'s.

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
item's version (etcd modifiedIndex) with at most ``RETRIES`` attempts
(``Datastore.update``, except where the block was just read or a handle
must be counted before its block is written); new blocks are created only
if absent.  Reads are quorum reads (the etcd adapter
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

Docker's requests (each with a fresh handle) are batched per process
(``_Batches``, a group commit): concurrent requests share one block write,
each with its own handle and attributes, so the threads of one plugin do
not fight over the block's compare-and-swap.
"""
from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from netplugin.datastore import CompareFailed, Datastore, KeyExists, KeyNotFound
from netplugin.datastore.base import KEEP, Item
from netplugin.datastore.base import TooMuchContention as DatastoreContention
from netplugin.errors import Conflict, NotFound

from backends.calico import model
from backends.calico.model import (AddressInUse, Block, CorruptData, Handle, IPAddress,
                                   IPNetwork, IpamConfig, IpamError, Pool, block_cidr_for,
                                   block_dir, block_key, cidr_from_key, handle_key,
                                   host_affinity_dir, host_affinity_key, pool_dir)

log = logging.getLogger(__name__)

RETRIES = 100            # compare-and-swap attempts (libcalico RETRIES)
KEY_ERROR_RETRIES = 3    # re-queues of a listed affine block that does not exist
CLAIM_RETRIES = 100      # block claims per auto-assign
WALK_READS = 8           # candidate reads before listing every block instead

# The records and keys of the model, also under this module's names (callers
# and netpluginctl use ``ipam.Block``, ``ipam.HOST_ROOT`` ...).
BLOCK_SIZE_BITS, BLOCK_SIZE, BLOCK_PREFIXLEN = (model.BLOCK_SIZE_BITS, model.BLOCK_SIZE,
                                                model.BLOCK_PREFIXLEN)
IPAM_ROOT, CONFIG_KEY, HANDLE_ROOT = model.IPAM_ROOT, model.IPAM_CONFIG_KEY, model.HANDLE_ROOT
HOST_ROOT, BLOCK_ROOT = model.AFFINITY_ROOT, model.BLOCK_ROOT
_truthy = model.truthy
__all__ = ["AddressInUse", "Block", "CorruptData", "Handle", "IPAddress", "IPNetwork",
           "IpamConfig", "IpamError", "Pool", "block_cidr_for", "block_dir", "block_key",
           "cidr_from_key", "handle_key", "host_affinity_dir", "host_affinity_key"]


# --------------------------------------------------------------------------
# errors (user-facing messages)


class PoolExhausted(IpamError, Conflict):
    """No free address in the pools the request may use."""


class NoPools(IpamError, NotFound):
    """No enabled Calico IPAM pool (of the wanted version / for the network)."""


class AddressNotInPool(IpamError, NotFound):
    """A specific address outside every enabled Calico IPAM pool."""


class NoHostAffinity(IpamError, Conflict):
    """strict_affinity forbids using another host's block."""


class TooMuchContention(IpamError, DatastoreContention):
    """Compare-and-swap kept failing RETRIES times."""


# --------------------------------------------------------------------------
# small helpers


def _fnv1a_32(text: str) -> int:
    h = 0x811C9DC5
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def _backoff(attempt: int) -> None:
    """A short random pause after a lost compare-and-swap (spreads contenders)."""
    if attempt >= 1:
        time.sleep(random.random() * min(0.0005 * 2 ** min(attempt, 7), 0.05))


def _overlaps(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version and a.overlaps(b)


def describe(nets: Iterable) -> str:
    return ", ".join(str(n) for n in nets) or "(none)"


# --------------------------------------------------------------------------
# batching concurrent requests of one process (group commit)


class _Waiting:
    """One request in a batch: its handle, then its address (None: not served)."""
    __slots__ = ("handle_id", "ip", "error", "done")

    def __init__(self, handle_id: str):
        self.handle_id = handle_id
        self.ip: Optional[IPAddress] = None
        self.error: Optional[BaseException] = None
        self.done = False


class _Batches:
    """Per key, one leader at a time runs a batch of every request that
    arrived while the previous batch ran; the others wait for its answer.
    One request alone is its own batch at once (no added wait)."""

    def __init__(self, workers: int = 8):
        self._cv = threading.Condition()
        self._queues: Dict[Any, List[_Waiting]] = {}
        self._running: Set[Any] = set()
        self._workers = workers
        self._executor: Optional[ThreadPoolExecutor] = None
        #: key -> the block that served its last request: a hint, checked
        #: when read (a block of another host or a full one is dropped)
        self.last_block: Dict[Any, IPNetwork] = {}

    def executor(self) -> ThreadPoolExecutor:
        with self._cv:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._workers,
                                                    thread_name_prefix="ipam-handles")
            return self._executor

    def run(self, key, handle_id: str, serve: Callable[[List[_Waiting]], None]
            ) -> Optional[IPAddress]:
        me = _Waiting(handle_id)
        with self._cv:
            self._queues.setdefault(key, []).append(me)
            while not me.done and key in self._running:
                self._cv.wait()
            if not me.done:
                self._running.add(key)
                batch = self._queues.pop(key)
        if not me.done:
            try:
                serve(batch)
            except BaseException as exc:
                for waiting in batch:
                    if waiting.ip is None:
                        waiting.error = exc
            finally:
                with self._cv:
                    for waiting in batch:
                        waiting.done = True
                    self._running.discard(key)
                    self._cv.notify_all()
        if me.error is not None:
            raise me.error.with_traceback(None)
        return me.ip


# --------------------------------------------------------------------------
# the IPAM client


class CalicoIpam:
    """Calico IPAM v2 on a ``Datastore``; safe for concurrent use by any number
    of threads, processes and hosts (all coordination is in the datastore)."""

    def __init__(self, datastore: Datastore, retries: int = RETRIES):
        self.datastore = datastore
        self.retries = retries
        self._batches = _Batches()

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
        return Block.from_json(item.key, item.value, item.version)

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
                block = Block.from_json(item.key, item.value, item.version)
            except CorruptData as exc:
                log.warning("%s", exc)
                continue
            blocks[block.cidr] = block
        return blocks

    def read_handle(self, handle_id: str) -> Handle:
        item = self.datastore.get(handle_key(handle_id))
        return Handle.from_json(handle_id, item.value, item.version)

    def _update(self, key: str, mutate: Callable[[Optional[Item]], Any], what: str
                ) -> Optional[Item]:
        """``Datastore.update`` with this client's retries; TooMuchContention
        says ``what`` could not be done."""
        try:
            return self.datastore.update(key, mutate, retries=self.retries)
        except DatastoreContention:
            raise TooMuchContention(f"{what}: it changed concurrently {self.retries} "
                                    f"times in a row") from None

    def _change_handle(self, handle_id: str, cidr, amount: int, fresh: bool = False) -> None:
        """Add ``amount`` (may be negative) to the handle's count for ``cidr``;
        an empty handle is deleted.  Read-modify-CAS with retries.  ``fresh``:
        the handle is new (named after one request), so it is created without
        reading it first (1W instead of 1R 1W); if it exists after all, the
        read-modify-CAS path follows."""
        if fresh and amount > 0:
            handle = Handle(handle_id)
            handle.increment(cidr, amount)
            try:
                self.datastore.create(handle_key(handle_id), handle.to_json())
                return
            except KeyExists:
                pass

        def mutate(item: Optional[Item]):
            if item is None:
                if amount < 0:
                    log.warning("handle %s does not exist; cannot release %d address(es) "
                                "of block %s from it", handle_id, -amount, cidr)
                    return KEEP
                handle = Handle(handle_id)
            else:
                handle = Handle.from_json(handle_id, item.value, item.version)
            if amount >= 0:
                handle.increment(cidr, amount)
            else:
                handle.decrement(cidr, -amount)
            return None if handle.empty and item is not None else handle.to_json()

        self._update(handle_key(handle_id), mutate,
                     f"could not update Calico IPAM handle {handle_id}")

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
                           host: Optional[str], fresh: bool = False) -> List[IPAddress]:
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
                self._change_handle(handle_id, block.cidr, len(ips), fresh and not attempt)
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
                    secondary: Any = None, fresh_handle: bool = False) -> List[IPAddress]:
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
                                                 secondary, within, host,
                                                 fresh=fresh_handle and not found)
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
                                within, host, fresh=fresh_handle and not found)
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
                                                     secondary, within, host,
                                                     fresh=fresh_handle and not found)
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
                                                 secondary, within, None,
                                                 fresh=fresh_handle and not found)
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

    def _assign_batch(self, version: int, host: str, within: Optional[IPNetwork],
                      batch: List[_Waiting]) -> None:
        """Concurrent requests of this process for one (version, host, within)
        as one write per block: the block that served the last batch is read
        (then, for what is left, the host's affine blocks), each waiting
        request takes one address of it in memory, every request's fresh
        handle is created (in parallel), then the block is written once
        (CAS).  A lost CAS gives the handles back and tries again on the
        re-read block.  Requests left over (the blocks are full) keep ``ip``
        None and take the full path (claims, borrowing).  Alone, a request
        costs 1R 2W while the remembered block has room (the block, its
        handle, the block write), else what ``auto_assign`` costs."""
        key = (version, host, within)
        pending = list(batch)
        last = self._batches.last_block.get(key)
        if last is not None:
            pending = self._batch_try(key, last, host, within, pending)
        if not pending:
            return
        for cidr in self.affine_blocks(host, version, within):
            if cidr != last:
                pending = self._batch_try(key, cidr, host, within, pending)
                if not pending:
                    return

    def _batch_try(self, key, cidr: IPNetwork, host: str, within: Optional[IPNetwork],
                   pending: List[_Waiting]) -> List[_Waiting]:
        """``_batch_in_block``, remembering the block if it served any."""
        try:
            left = self._batch_in_block(cidr, host, within, pending)
        except (KeyNotFound, CorruptData):
            left = pending       # the full path deals with it
        if len(left) < len(pending):
            self._batches.last_block[key] = cidr
        elif self._batches.last_block.get(key) == cidr:
            self._batches.last_block.pop(key, None)
        return left

    def _batch_in_block(self, cidr: IPNetwork, host: str, within: Optional[IPNetwork],
                        pending: List[_Waiting]) -> List[_Waiting]:
        """Serve what ``pending`` the block ``cidr`` has room for; the rest."""
        for attempt in range(self.retries):
            if attempt:
                _backoff(attempt)
            block = self.read_block(cidr)
            if block.host != host:
                return pending
            taken: List[Tuple[_Waiting, IPAddress]] = []
            for waiting in pending:
                ips = block.auto_assign(1, waiting.handle_id, None, within)
                if not ips:
                    break
                taken.append((waiting, ips[0]))
            if not taken:
                return pending
            created = self._create_handles([w.handle_id for w, _ in taken], block.cidr)
            try:
                self._write_block(block)
            except CompareFailed:
                self._drop_handles(created, block.cidr)
                continue
            # any other failure: outcome unknown (the datastore went away);
            # as in _assign_from_block, the handle counts stay
            for waiting, ip in taken:
                waiting.ip = ip
            return pending[len(taken):]
        raise TooMuchContention(
            f"could not allocate from Calico IPAM block {cidr}: it changed "
            f"concurrently {self.retries} times in a row")

    def _create_handles(self, handle_ids: List[str], cidr: IPNetwork) -> List[str]:
        """Count one address of ``cidr`` in each (fresh) handle, all at once
        (``_change_handle``); on a failure the handles counted are given back."""
        def one(handle_id: str) -> str:
            self._change_handle(handle_id, cidr, 1, fresh=True)
            return handle_id
        if len(handle_ids) == 1:
            return [one(handle_ids[0])]
        futures = [self._batches.executor().submit(one, h) for h in handle_ids]
        done, errors = [], []
        for future in futures:
            try:
                done.append(future.result())
            except Exception as exc:
                errors.append(exc)
        if errors:
            self._drop_handles(done, cidr)
            raise errors[0]
        return done

    def _drop_handles(self, handle_ids: List[str], cidr: IPNetwork) -> None:
        """Undo ``_create_handles`` (a lost block CAS), as ``_assign_from_block`` does."""
        for handle_id in handle_ids:
            self._change_handle(handle_id, cidr, -1)

    def auto_assign_one(self, version: int, host: str, within: Optional[IPNetwork] = None,
                        handle_id: Optional[str] = None, secondary: Any = None,
                        fresh_handle: bool = False) -> IPAddress:
        """One address, or PoolExhausted / NoPools with a message for the user.
        A request with a fresh handle joins this host's batch first (see
        ``_assign_batch``); what the batch cannot serve takes the full path."""
        batched = fresh_handle and handle_id is not None and secondary is None
        if batched:
            ip = self._batches.run((version, host, within), handle_id,
                                   lambda batch: self._assign_batch(version, host, within, batch))
            if ip is not None:
                return ip
        ips = self.auto_assign(version, 1, host, within, handle_id, secondary, fresh_handle)
        if ips:
            if batched:    # the next batch starts at the block this one used
                self._batches.last_block[(version, host, within)] = block_cidr_for(ips[0])
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
                  secondary: Any = None, fresh_handle: bool = False) -> IPAddress:
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
                self._change_handle(handle_id, cidr, 1, fresh_handle)
                fresh_handle = False
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
    def attributes_of(self, address) -> Optional[Dict[str, Any]]:
        """The block attributes of an allocated address, or None (1R)."""
        ip = ipaddress.ip_address(address)
        try:
            return self.read_block(block_cidr_for(ip)).attributes_of(ip)
        except KeyNotFound:
            return None

    def release_ips(self, addresses: Iterable) -> Set[IPAddress]:
        """Free the addresses; return those that were not allocated."""
        return self.release_ips_keeping(addresses)[0]

    def release_ips_keeping(self, addresses: Iterable,
                            keep: Optional[Callable[[Dict[str, Any]], bool]] = None
                            ) -> Tuple[Set[IPAddress], Set[IPAddress]]:
        """Free the addresses but those whose block attributes ``keep``
        accepts; return (those that were not allocated, those kept)."""
        by_block: Dict[IPNetwork, Set[IPAddress]] = {}
        for a in addresses:
            ip = ipaddress.ip_address(a)
            by_block.setdefault(block_cidr_for(ip), set()).add(ip)
        not_allocated: Set[IPAddress] = set()
        kept: Set[IPAddress] = set()
        for cidr, ips in sorted(by_block.items(), key=lambda kv: (kv[0].version, kv[0])):
            missing, stayed = self._release_from_block(cidr, ips, keep)
            not_allocated |= missing
            kept |= stayed
        return not_allocated, kept

    def _release_from_block(self, cidr: IPNetwork, ips: Set[IPAddress], keep=None
                            ) -> Tuple[Set[IPAddress], Set[IPAddress]]:
        result: Dict[str, Any] = {}

        def mutate(item: Optional[Item]):
            result.clear()
            if item is None:
                result.update(missing=set(ips), kept=set(), handles={})
                return KEEP
            block = Block.from_json(item.key, item.value, item.version)
            not_allocated, handles = block.release(ips, keep)
            kept = {ip for ip in ips - not_allocated if block.attributes_of(ip) is not None}
            result.update(missing=not_allocated, kept=kept, handles=handles, block=block)
            if len(not_allocated) + len(kept) == len(ips):
                return KEEP
            return self._after_release(block)

        if self._update(block_key(cidr), mutate,
                        f"could not release addresses of Calico IPAM block {cidr}") is None \
                and "block" in result:
            log.info("deleted empty Calico IPAM block %s (no affinity)", cidr)
        for handle_id, count in result["handles"].items():
            if handle_id is not None:
                self._change_handle(handle_id, cidr, -count)
        return result["missing"], result["kept"]

    @staticmethod
    def _after_release(block: Block) -> Optional[str]:
        """What a block becomes once addresses are freed: an empty block
        without affinity is deleted (None), others keep their new value."""
        return None if block.empty and block.host is None else block.to_json()

    def _store_after_release(self, block: Block) -> None:
        """CAS-delete an empty block without affinity, else CAS-update it, at
        the version it was read (CompareFailed / KeyNotFound if it changed)."""
        if self._after_release(block) is None:
            self.datastore.delete(block.key, block.version)
            log.info("deleted empty Calico IPAM block %s (no affinity)", block.cidr)
        else:
            self._write_block(block)

    def release_at_version(self, cidr, ips: Set[IPAddress], version: Optional[int],
                           may_release: Callable[[Optional[str]], bool] = lambda h: True
                           ) -> Optional[Set[IPAddress]]:
        """Free ``ips`` in block ``cidr`` only if the block is still at
        ``version`` and ``may_release`` accepts the handle of each (a handle
        of None is always released); the addresses freed, or None when the
        block changed or a handle forbids it (nothing is changed then)."""
        try:
            block = self.read_block(cidr)
        except KeyNotFound:
            return set()
        if block.version != version:
            return None
        not_allocated, handles = block.release(ips)
        if any(h is not None and not may_release(h) for h in handles):
            return None
        freed = set(ips) - not_allocated
        if not freed:
            return set()
        try:
            self._store_after_release(block)
        except (CompareFailed, KeyNotFound):
            return None
        self.uncount(cidr, handles)
        return freed

    def uncount(self, cidr, handles: Dict[Optional[str], int]) -> None:
        """Take addresses freed in block ``cidr`` out of their handles
        (``{handle: count}``); best effort: the block is right already, a
        handle count is not vital."""
        for handle_id, count in handles.items():
            if handle_id is not None:
                try:
                    self._change_handle(handle_id, cidr, -count)
                except Exception as exc:
                    log.warning("handle %s of block %s: %s", handle_id, cidr, exc)

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
            freed: List[IPAddress] = []

            def mutate(item: Optional[Item]):
                freed.clear()
                if item is None:
                    return KEEP
                block = Block.from_json(item.key, item.value, item.version)
                freed.extend(block.release_handle(handle_id))
                return self._after_release(block) if freed else KEEP

            if self._update(block_key(cidr), mutate,
                            f"could not release handle {handle_id} in block {cidr}") is None \
                    and freed:
                log.info("deleted empty Calico IPAM block %s (no affinity)", cidr)
            released += freed
            # a block that no longer holds any of the handle's addresses drops
            # out of the handle whatever it counted
            self._change_handle(handle_id, cidr, -(len(freed) or handle.block[cidr_text]))
        return released
