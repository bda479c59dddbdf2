"""Copy the Calico tree (``/calico``) from one datastore to another (v2 etcd
or the embedded store to etcdv3, say): ``netpluginctl datastore migrate
--from CFG --to CFG [--dry-run]``.

Pure plan, then apply: ``plan(source_items, target_items)`` says for every
source key whether the target must create it, update it or already has it;
``apply`` does that with create-only / compare-and-swap writes, so a second
run finds nothing to do (idempotent) and a key someone changes in the target
meanwhile is reported, not overwritten.  Keys only in the target are left.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from netplugin.datastore.base import CompareFailed, Datastore, DatastoreError, Item, KeyExists

TREE = "/calico"


@dataclass
class Plan:
    create: List[Item] = field(default_factory=list)   # source items the target lacks
    update: List[tuple] = field(default_factory=list)  # (source item, target item)
    unchanged: int = 0
    extra: List[str] = field(default_factory=list)     # target keys the source lacks

    @property
    def writes(self) -> int:
        return len(self.create) + len(self.update)


def plan(source: List[Item], target: List[Item]) -> Plan:
    have: Dict[str, Item] = {i.key: i for i in target}
    result = Plan()
    for item in source:
        there = have.pop(item.key, None)
        if there is None:
            result.create.append(item)
        elif there.value != item.value:
            result.update.append((item, there))
        else:
            result.unchanged += 1
    result.extra = sorted(have)
    return result


def apply(todo: Plan, target: Datastore, step: Callable[[], None] = lambda: None) -> List[str]:
    """Write ``todo`` to ``target``; returns the keys that changed in the
    target meanwhile (not written).  ``step()`` after each key."""
    conflicts: List[str] = []
    for item in todo.create:
        try:
            target.create(item.key, item.value)
        except KeyExists:
            if target.get(item.key).value != item.value:
                conflicts.append(item.key)
        step()
    for item, there in todo.update:
        try:
            target.compare_and_swap(item.key, item.value, there.version)
        except CompareFailed:
            conflicts.append(item.key)
        step()
    return conflicts


def migrate(source: Datastore, target: Datastore, dry_run: bool = False,
            progress: Optional[Callable[[int], object]] = None) -> Dict:
    """Plan (and unless ``dry_run`` apply) the copy; a summary dict."""
    src = source.list_prefix(TREE)
    todo = plan(src, target.list_prefix(TREE))
    conflicts: List[str] = []
    if not dry_run and todo.writes:
        stepper = progress(todo.writes) if progress else None
        conflicts = apply(todo, target, (lambda: stepper.step()) if stepper else (lambda: None))
        if stepper is not None:
            stepper.close()
    summary = {"dry_run": dry_run, "source_keys": len(src),
               "created": len(todo.create), "updated": len(todo.update),
               "unchanged": todo.unchanged, "extra_in_target": len(todo.extra),
               "conflicts": conflicts}
    if conflicts:
        raise MigrateConflict(summary)
    return summary


class MigrateConflict(DatastoreError):
    def __init__(self, summary: Dict):
        keys = summary["conflicts"]
        super().__init__(f"{len(keys)} key(s) changed in the target during the copy and were "
                         f"not overwritten (first: {keys[0]}); run the migration again")
        self.summary = summary
