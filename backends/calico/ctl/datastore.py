"""netpluginctl's ``datastore migrate``: the Calico tree copied from the datastore
of one config to that of another (``netplugin.datastore.migrate``), or a dry run.
"""
from __future__ import annotations

import sys

from netplugin.config import load_config
from netplugin.datastore import migrate, open_datastore
from netplugin.progress import Progress

from backends.calico.ctl.base import CtlError, _json_text


def datastore_migrate(source: str, target: str, dry_run: bool, as_json: bool,
                      out=None) -> int:
    """``datastore migrate``: the Calico tree of ``source``'s datastore into
    ``target``'s; progress on a terminal only, a summary (or --json)."""

    out = out or sys.stdout
    src_cfg, dst_cfg = load_config(source), load_config(target)
    if (src_cfg.datastore.type, src_cfg.datastore.path, src_cfg.datastore.endpoints,
            src_cfg.datastore.address) == (dst_cfg.datastore.type, dst_cfg.datastore.path,
                                           dst_cfg.datastore.endpoints, dst_cfg.datastore.address):
        raise CtlError(f"{source} and {target} name the same datastore")
    src = open_datastore(src_cfg.datastore)
    try:
        dst = open_datastore(dst_cfg.datastore)
        try:
            summary = migrate.migrate(
                src, dst, dry_run,
                progress=lambda total: Progress("datastore migrate", total, "keys",
                                                enabled=False if as_json else None))
        finally:
            dst.close()
    finally:
        src.close()
    summary.update({"from": f"{src_cfg.datastore.type} ({source})",
                    "to": f"{dst_cfg.datastore.type} ({target})"})
    if as_json:
        print(_json_text(summary), file=out)
    else:
        verb = "would write" if dry_run else "wrote"
        print(f"{summary['from']} -> {summary['to']}: {summary['source_keys']} keys; {verb} "
              f"{summary['created']} new, {summary['updated']} changed; "
              f"{summary['unchanged']} already there; {summary['extra_in_target']} only in "
              "the target (left)", file=out)
    return 0


