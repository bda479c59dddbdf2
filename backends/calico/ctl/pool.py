"""netpluginctl's IP pools: ``pool add``, ``pool remove`` (disable, release the
blocks' host affinities, delete) and ``pool show``.

Pools live at ``/calico/v1/ipam/v<4|6>/pool/<cidr with - for />``; blocks and
affinities are Calico IPAM v2's (``backends.calico.ipam``).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from netplugin.datastore import KEEP, KeyNotFound, TooMuchContention

from backends.calico import ipam as ci
from backends.calico import model
from backends.calico.ctl import base
from backends.calico.ctl.base import PROG, CtlBase, CtlError, format_table, parse_cidr


class PoolCommands(CtlBase):
    def _all_pools(self) -> List[model.Pool]:
        return self.ipam.pools(4) + self.ipam.pools(6)

    def pool_add(self, cidrs: Sequence[str], ipip: bool, nat_outgoing: bool) -> int:
        nets = [parse_cidr(c) for c in cidrs]
        existing = {p.cidr: p for p in self._all_pools()}
        for i, net in enumerate(nets):
            if ipip and net.version == 6:
                raise CtlError(f"{net}: IPIP is not supported on IPv6 pools")
            for other in nets[:i]:
                if other.version == net.version and other.overlaps(net):
                    raise CtlError(f"pools {other} and {net} given together overlap")
            same = existing.get(net)
            if (same is None or same.ipam) and net.prefixlen > model.BLOCK_PREFIXLEN[net.version]:
                raise CtlError(f"{net} is smaller than one IPAM block: IPv{net.version} pools "
                               f"need a prefix of /{model.BLOCK_PREFIXLEN[net.version]} or "
                               "shorter")
            for cidr in existing:
                if cidr != net and cidr.version == net.version and cidr.overlaps(net):
                    raise CtlError(f"cannot add pool {net}: it overlaps the existing pool "
                                   f"{cidr} (only an identical CIDR can be updated)")
        done = []
        for net in nets:
            key = model.pool(net)

            def mutate(value, net=net):
                value = dict(value) if isinstance(value, dict) else {}
                value["cidr"] = str(net)
                value.pop("disabled", None)
                value.pop("ipip", None)
                value.pop("masquerade", None)
                if ipip:
                    value["ipip"] = "tunl0"
                if nat_outgoing:
                    value["masquerade"] = True
                return value

            updated = net in existing
            self._update_json(key, mutate, f"pool {net}", default={"cidr": str(net)})
            done.append({"cidr": str(net), "action": "updated" if updated else "added",
                         "ipip": ipip, "nat_outgoing": nat_outgoing})
        if ipip:
            self.store.put(base.IPIP_CONFIG_KEY, "true")  # as libcalico's add_ip_pool does
        self.emit("\n".join(f"{d['action'].capitalize()} pool {d['cidr']}" for d in done),
                  done)
        return 0

    def pool_remove(self, cidrs: Sequence[str]) -> int:
        nets = [parse_cidr(c) for c in cidrs]
        existing = {p.cidr: p for p in self._all_pools()}
        for net in nets:
            if net not in existing:
                raise CtlError(f"pool {net} not found (see '{PROG} pool show')")
        # 1. disable: no new blocks are claimed from these pools
        for net in nets:
            def disable(value, net=net):
                value = dict(value) if isinstance(value, dict) else {"cidr": str(net)}
                if value.get("disabled") is True:
                    return None
                value["disabled"] = True
                return value
            self._update_json(model.pool(net), disable, f"pool {net}")
        # 2. let allocations already in flight finish, then release affinities
        if base.POOL_REMOVE_GRACE > 0:
            time.sleep(base.POOL_REMOVE_GRACE)
        results = []
        for net in nets:
            released = self._release_pool_affinities(net)
            try:
                self.store.delete(model.pool(net))
            except KeyNotFound:
                pass
            # a claim that raced with step 2 (rare): sweep once more
            released += self._release_pool_affinities(net)
            results.append({"cidr": str(net), "released_affinities": released})
        lines = []
        for r in results:
            lines.append(f"Removed pool {r['cidr']}")
            for a in r["released_affinities"]:
                what = "deleted empty block" if a["block_deleted"] else "block kept"
                lines.append(f"  released affinity of host {a['host']} to block "
                             f"{a['block']} ({what})")
        self.emit("\n".join(lines), results)
        return 0

    def _release_pool_affinities(self, pool: model.IPNetwork) -> List[Dict[str, Any]]:
        """Release every (host, block) affinity whose block lies in ``pool``."""
        todo = []
        for item in self.store.list_prefix(model.AFFINITY_ROOT + "/"):
            parsed = model.parse_affinity_key(item.key)
            if parsed is None or parsed[1] != pool.version:
                continue
            try:
                block = model.cidr_from_key(item.key)
            except ValueError:
                continue
            if block.version == pool.version and block.subnet_of(pool):
                todo.append((parsed[0], block))
        released = []
        with self.progress(f"pool remove {pool}", len(todo), "blocks") as shown:
            for host, block in todo:
                deleted = self._release_block_affinity(host, block)
                released.append({"host": host, "block": str(block), "block_deleted": deleted})
                shown.step()
        return released

    def _release_block_affinity(self, host: str, cidr: model.IPNetwork) -> bool:
        """Drop ``host``'s affinity to ``cidr``: delete the block when it is
        empty, else clear its affinity (one ``Datastore.update``); then delete
        the affinity key.  True when the block was deleted."""
        deleted = [False]

        def mutate(item):
            deleted[0] = False
            if item is None:
                return KEEP
            block = model.Block.from_json(item.key, item.value, item.version)
            if block.host != host:
                return KEEP    # another host's block (or none): only our key is stale
            if block.empty:
                deleted[0] = True
                return None
            block.affinity = None
            return block.to_json()

        try:
            self.store.update(model.block_key(cidr), mutate, retries=ci.RETRIES)
        except TooMuchContention:
            raise CtlError(f"block {cidr} kept changing concurrently; try again") from None
        try:
            self.store.delete(model.host_affinity_key(host, cidr))
        except KeyNotFound:
            pass
        return deleted[0]

    def pool_show(self, version: Optional[int]) -> int:
        versions = [version] if version else [4, 6]
        data = []
        tables = []
        for v in versions:
            rows = []
            for pool in self.ipam.pools(v):
                raw = pool.raw
                entry = {"cidr": str(pool.cidr), "version": v,
                         "ipip": bool(raw.get("ipip")),
                         "nat_outgoing": model.truthy(raw.get("masquerade"), False),
                         "ipam": pool.ipam, "disabled": pool.disabled,
                         "state": pool.state()}
                data.append(entry)
                options = [name for name, on in (("ipip", entry["ipip"]),
                                                 ("nat-outgoing", entry["nat_outgoing"]),
                                                 ("disabled", pool.disabled),
                                                 ("no-ipam", not pool.ipam)) if on]
                rows.append([str(pool.cidr), ",".join(options)])
            tables.append(format_table([f"IPv{v} CIDR", "Options"], rows))
        self.emit("\n".join(tables), data)
        return 0
