"""The OVSDB schema the Nuage tests run ovsdb-server with.

Nuage's own ``vswitch.ovsschema`` (shipped with VRS) is not public.  The tests
use the stock Open vSwitch schema installed on the machine with the two Nuage
tables merged in (``nuage-tables.json`` beside this file: column names and
kinds as libvrsdk writes them, both tables ``isRoot`` so that rows nobody
references survive, an index on the key column so that a duplicate insert
fails loudly).  The database keeps the stock name (``Open_vSwitch``) and
version, so the stock ``ovs-vswitchd`` accepts it and ignores the extra tables.

``vswitch-nuage.ovsschema`` is the merge against the stock schema this was
written with (8.3.1, Debian 12's openvswitch 3.1), kept for reading; tests
always merge at run time with the installed stock file (see ``write_merged``),
so another OVS version works too.  Regenerate the kept copy with
``python -m tests.nuage.schema``.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict

HERE = os.path.dirname(os.path.abspath(__file__))
STOCK_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
NUAGE_TABLES = os.path.join(HERE, "nuage-tables.json")
MERGED_COPY = os.path.join(HERE, "vswitch-nuage.ovsschema")

NUAGE_TABLE_NAMES = ("Nuage_VM_Table", "Nuage_Port_Table")


def nuage_tables() -> Dict[str, Any]:
    with open(NUAGE_TABLES) as f:
        return json.load(f)


def merged_schema(stock_path: str = STOCK_SCHEMA) -> Dict[str, Any]:
    """The stock schema with the Nuage tables added (name and version kept)."""
    with open(stock_path) as f:
        schema = json.load(f)
    extra = nuage_tables()
    clash = sorted(set(extra) & set(schema["tables"]))
    if clash:
        raise ValueError(f"{stock_path} already has table(s) {', '.join(clash)}")
    schema["tables"].update(extra)
    schema.pop("cksum", None)  # ovsdb-tool does not check it; a stale one would mislead
    return schema


def write_merged(path: str, stock_path: str = STOCK_SCHEMA) -> str:
    """Write the merged schema to ``path``; return ``path``."""
    with open(path, "w") as f:
        json.dump(merged_schema(stock_path), f, indent=2, sort_keys=True)
        f.write("\n")
    return path


if __name__ == "__main__":  # pragma: no cover - maintenance helper
    out = sys.argv[1] if len(sys.argv) > 1 else MERGED_COPY
    print(write_merged(out))
