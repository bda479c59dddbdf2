"""Run test code inside a private, throwaway network namespace.

``run_in_netns(code)`` starts ``unshare --net --fork <python> -c <code>`` with
the repository on ``sys.path``.  The namespace belongs to that process and
dies with it, so nothing the code creates (links, routes, sysctls) can leak
into the machine's own namespace and no cleanup is needed.  The child calls
``emit(obj)`` to hand back a JSON result, which ``run_in_netns`` returns.

Before running the code the child checks that its network namespace differs
from the parent's and aborts otherwise.  Helpers for the child (``links()``,
``routes()``, ``sysctl()``...) live in this module too; the child imports it.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "NETNS-RESULT "
_PARENT_NS_ENV = "NETPLUGIN_TEST_PARENT_NETNS"

_PRELUDE = """\
import json, os, sys
sys.path.insert(0, {repo!r})
if os.readlink("/proc/self/ns/net") == os.environ[{env!r}]:
    sys.exit("refusing to run: still in the parent's network namespace")
from tests.netns_runner import *
"""


def _own_netns() -> str:
    return os.readlink("/proc/self/ns/net")


@functools.lru_cache(maxsize=1)
def netns_unavailable_reason() -> Optional[str]:
    """None if ``unshare --net`` works here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    try:
        proc = subprocess.run(["unshare", "--net", "--fork", "true"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare --net failed: {exc}"
    if proc.returncode != 0:
        return f"unshare --net failed: {proc.stderr.strip()}"
    return None


def run_in_netns(code: str, timeout: float = 30, env: Optional[Dict[str, str]] = None) -> Any:
    """Run ``code`` (dedented) in a new network namespace; return what it ``emit``-ted.

    Raises AssertionError with the child's output if it fails or emits nothing."""
    script = _PRELUDE.format(repo=REPO, env=_PARENT_NS_ENV) + textwrap.dedent(code)
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env[_PARENT_NS_ENV] = _own_netns()
    child_env["PYTHONPATH"] = REPO + os.pathsep + child_env.get("PYTHONPATH", "")
    proc = subprocess.run(["unshare", "--net", "--fork", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=child_env)
    results = [line[len(MARKER):] for line in proc.stdout.splitlines()
               if line.startswith(MARKER)]
    if proc.returncode != 0 or not results:
        raise AssertionError(
            f"netns child failed (exit {proc.returncode})\n--- stdout\n{proc.stdout}"
            f"\n--- stderr\n{proc.stderr}")
    return json.loads(results[-1])


# --------------------------------------------------------------------------
# helpers for the child


def emit(obj: Any) -> None:
    """Hand ``obj`` (JSON-serialisable) back to ``run_in_netns``."""
    print(MARKER + json.dumps(obj), flush=True)


def _ip_json(*args: str) -> List[dict]:
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out or "[]")


def links() -> Dict[str, dict]:
    """``{ifname: {"mtu", "mac", "up", "kind"}}`` for every link in this netns."""
    from pyroute2 import IPRoute
    out = {}
    with IPRoute() as ipr:
        for msg in ipr.get_links():
            info = msg.get("IFLA_LINKINFO")
            out[msg.get("IFLA_IFNAME")] = {
                "index": msg["index"], "mtu": msg.get("IFLA_MTU"),
                "mac": msg.get("IFLA_ADDRESS"), "up": bool(msg["flags"] & 1),
                "kind": info.get("IFLA_INFO_KIND") if info else None}
    return out


def routes(dev: Optional[str] = None) -> List[dict]:
    """Main-table routes as ``ip -j route`` prints them (IPv4 and IPv6),
    kernel link-local/multicast IPv6 ones left out."""
    found = _ip_json("-4", "route", "show") + _ip_json("-6", "route", "show")
    return [r for r in found if not r.get("dst", "").startswith(("fe80:", "ff00:"))
            and (dev is None or r.get("dev") == dev)]


def addresses(dev: str) -> List[str]:
    """``ip/prefix`` of every address on ``dev``."""
    out = []
    for link in _ip_json("addr", "show", "dev", dev):
        for a in link.get("addr_info", []):
            out.append(f"{a['local']}/{a['prefixlen']}")
    return out


def sysctl(name: str) -> Optional[str]:
    try:
        with open(os.path.join("/proc/sys", name)) as f:
            return f.read().strip()
    except OSError:
        return None


def calico_backend(state_path: str, hostname: str = "host-a", mtu: int = 1400):
    """A CalicoBackend on a fresh embedded datastore (wrapped in CountingDatastore)."""
    import backends.calico.driver  # noqa: F401  (registers "calico")
    from backends.calico.driver import CalicoBackend
    from netplugin.config import config_from_text
    from netplugin.datastore import CountingDatastore
    from netplugin.datastore.embedded import EmbeddedDatastore

    state_dir = os.path.join(os.path.dirname(state_path), "run")
    cfg = config_from_text(
        f'backend = "calico"\nstate_dir = {json.dumps(state_dir)}\n'
        f'[datastore]\ntype = "embedded"\npath = {json.dumps(state_path)}\n'
        f'[calico]\nhostname = {json.dumps(hostname)}\nmtu = {mtu}\n'
        # No dockerd here: network names come from -o profile or the tests.
        f'docker_endpoint = {json.dumps("unix://" + state_dir + "/no-docker.sock")}\n')
    store = CountingDatastore(EmbeddedDatastore.from_config(cfg.datastore))
    return CalicoBackend(cfg, store), store
