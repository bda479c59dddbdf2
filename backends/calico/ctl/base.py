"""netpluginctl's common ground: its constants, error, table and JSON output,
the CIDR/IP/name parsers, external commands, and ``CtlBase`` (config, store, emit, update).

Every command class (one module per noun) derives from ``CtlBase``; the
constants and ``run_command`` are read through this module, so tests replace
them here.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import subprocess
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from netplugin.config import Config
from netplugin.datastore import KEEP, Datastore, KeyNotFound, TooMuchContention
from netplugin.errors import PluginError
from netplugin.progress import Progress

from backends.calico import ipam as ci
from backends.calico import model

PROG = "netpluginctl"
#: Profile names and tags Felix accepts: letters, digits, '_', '.' and '-'.
NAME_RE = model.VALID_ID_RE
#: Seconds ``pool remove`` waits between disabling a pool and releasing its
#: blocks' affinities, for allocations already in flight (calicoctl: 3 s).
POOL_REMOVE_GRACE = 1.0
#: Attempts of one read-modify-compare-and-swap.
CAS_RETRIES = 20
#: Seconds for the plugin socket, dockerd and each external command.
PLUGIN_TIMEOUT = 3.0
DOCKER_TIMEOUT = 2.0
COMMAND_TIMEOUT = 10.0
IPIP_CONFIG_KEY = "/calico/v1/config/IpInIpEnabled"


class CtlError(PluginError):
    """A user-facing failure of a command (one line)."""


class _Usage(Exception):
    """Bad command line for a hand-parsed subcommand (exit 2)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


# --------------------------------------------------------------------------
# output


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A prettytable-style table (``+---+`` borders, like calicoctl's);
    cells may hold several lines."""
    grid = [[("" if c is None else str(c)).split("\n") for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in grid:
        for i, lines in enumerate(row):
            widths[i] = max(widths[i], *(len(line) for line in lines))
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [rule, "| " + " | ".join(h.center(w) for h, w in zip(headers, widths)) + " |", rule]
    for row in grid:
        height = max((len(lines) for lines in row), default=1)
        for n in range(height):
            out.append("| " + " | ".join(
                (lines[n] if n < len(lines) else "").ljust(w)
                for lines, w in zip(row, widths)) + " |")
    out.append(rule)
    return "\n".join(out)


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)



def parse_cidr(text: str) -> model.IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise CtlError(f"{text!r} is not a valid CIDR (e.g. 192.168.0.0/16)") from None
    raise CtlError(f"{text} has host bits set; did you mean {net}?")


def parse_ip(text: str) -> model.IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CtlError(f"{text!r} is not a valid IP address") from None


def check_name(name: str, what: str) -> str:
    if not NAME_RE.match(name or ""):
        raise CtlError(f"invalid {what} name {name!r}: use letters, digits, '_', '.' "
                       "and '-' only")
    return name



# --------------------------------------------------------------------------
# external commands (module level so tests can replace them)


def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT
                ) -> Tuple[int, str, str]:
    """(returncode, stdout, stderr); returncode 127 when the binary is missing."""
    if shutil.which(argv[0]) is None:
        return 127, "", f"{argv[0]}: command not found"
    try:
        proc = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=timeout, text=True)
    except subprocess.TimeoutExpired:
        return 124, "", f"{' '.join(argv)}: no answer within {timeout:g} s"
    except OSError as exc:
        return 126, "", f"{argv[0]}: {exc}"
    return proc.returncode, proc.stdout, proc.stderr


def ip_json(*args: str) -> List[Dict[str, Any]]:
    """``ip -j <args>`` decoded; CtlError when it fails."""
    rc, out, err = run_command(["ip", "-j", *args])
    if rc != 0:
        raise CtlError(f"ip -j {' '.join(args)} failed: {(err or out).strip() or rc}")
    if not out.strip():
        return []
    try:
        data = json.loads(out)
    except ValueError:
        raise CtlError(f"ip -j {' '.join(args)}: output is not JSON") from None
    return data if isinstance(data, list) else []



# --------------------------------------------------------------------------
# what every command has


class CtlBase:
    """The config, the datastore and the output of one netpluginctl run."""

    def __init__(self, cfg: Config, datastore: Datastore, as_json: bool = False,
                 out=None):
        self.cfg = cfg
        self.store = datastore
        self.ipam = ci.CalicoIpam(datastore)
        self.as_json = as_json
        self.out = out or sys.stdout

    @property
    def hostname(self) -> str:
        return self.cfg.calico.hostname

    def progress(self, label: str, total: Optional[int] = None, unit: str = "") -> Progress:
        """Progress of a long operation on stderr: shown on a terminal only,
        never with --json."""
        return Progress(label, total, unit, enabled=None if not self.as_json else False)

    def emit(self, text: Optional[str] = None, data: Any = None) -> None:
        """Print ``data`` as JSON with --json, else ``text``."""
        if self.as_json:
            print(_json_text(data), file=self.out)
        elif text is not None:
            print(text, file=self.out)

    # -- shared datastore helpers ----------------------------------------------
    def _read_json(self, key: str, default: Any = None) -> Tuple[Any, Optional[int]]:
        try:
            item = self.store.get(key)
        except KeyNotFound:
            return default, None
        try:
            return json.loads(item.value) if item.value else default, item.version
        except ValueError:
            raise CtlError(f"datastore key {key} does not hold valid JSON") from None

    def _update_json(self, key: str, mutate: Callable[[Any], Any], what: str,
                     default: Any = None) -> Any:
        """Read-modify-write ``key`` with ``Datastore.update`` (compare-and-swap,
        retried).  ``mutate`` gets a copy of the value (``default`` when absent,
        else KeyNotFound -> CtlError) and returns the new value, or None for
        "no change"; the value after the update is returned."""
        result: Dict[str, Any] = {}

        def step(item):
            if item is None:
                if default is None:
                    raise CtlError(f"{what} not found")
                value = json.loads(json.dumps(default))
            else:
                try:
                    value = json.loads(item.value) if item.value else None
                except ValueError:
                    raise CtlError(f"datastore key {key} does not hold valid JSON") from None
            new = mutate(value)
            result["value"] = value if new is None else new
            return KEEP if new is None else json.dumps(new)

        try:
            self.store.update(key, step, retries=CAS_RETRIES)
        except TooMuchContention:
            raise CtlError(f"{what} kept changing concurrently; try again") from None
        return result["value"]
