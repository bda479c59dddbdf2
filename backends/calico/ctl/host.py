"""netpluginctl's Calico hosts: ``host remove`` forgets a host that is gone (its
tombstone, endpoint records, block affinities, blocks and bird_ip).

The sweep itself, and the rules for what may be released, are
``backends.calico.hosts``'s.
"""
from __future__ import annotations

import logging
import time

from netplugin.datastore import KeyNotFound

from backends.calico import hosts as calico_hosts
from backends.calico.ctl import base
from backends.calico.ctl.base import CtlBase, CtlError, check_name

log = logging.getLogger("netpluginctl")


class HostCommands(CtlBase):
    def host_remove(self, name: str, force: bool = False) -> int:
        """Forget host ``name`` for good (backends/calico/hosts.py): tombstone,
        endpoint records (``--force``), then its affinities, blocks (addresses
        nothing refers to are released) and bird_ip, looked at twice."""
        check_name(name, "host")
        if name == self.hostname and not force:
            raise CtlError(f"{name} is this host (the config's [calico] hostname); "
                           "use --force to remove it anyway")
        records = calico_hosts.endpoint_records(self.store, name)
        if records and not force:
            raise CtlError(f"host {name} still has {len(records)} workload endpoint "
                           f"record(s); stop its containers, or use --force to delete "
                           f"the records too")
        for key in records:
            try:
                self.store.delete(key)
            except KeyNotFound:
                pass
        calico_hosts.mark_removed(self.store, name)
        first = calico_hosts.look(self.store, name)
        if base.POOL_REMOVE_GRACE > 0 and not first.empty():
            time.sleep(base.POOL_REMOVE_GRACE)      # let a write in flight land first
        second = calico_hosts.look(self.store, name)
        leftovers = calico_hosts.confirmed(first, second)
        try:
            referenced = calico_hosts.referenced_addresses(self.store)
        except ValueError as exc:   # a corrupt record may refer to any address
            log.warning("%s: no address released", exc)
            referenced = {a for b in leftovers.blocks.values() for a in b.allocated()}
        with self.progress(f"host remove {name}",
                           len(leftovers.blocks) + len(leftovers.affinities),
                           "blocks and affinities") as shown:
            done = calico_hosts.sweep(self.store, leftovers, referenced, step=shown.step)
        done["host"] = name
        done["endpoint_records_removed"] = records
        lines = [f"Removed host {name}"]
        lines += [f"  deleted endpoint record {k}" for k in records]
        lines += [f"  released block {b}" for b in done["blocks_released"]]
        lines += [f"  deleted block {b}" for b in done["blocks_deleted"]]
        lines += [f"  deleted affinity {k}" for k in done["affinities_removed"]]
        if done["addresses_released"]:
            lines.append(f"  released {len(done['addresses_released'])} address(es)")
        lines += [f"  {k} (every agent sweeps again)" for k in done["kept"]]
        self.emit("\n".join(lines), done)
        return 0

