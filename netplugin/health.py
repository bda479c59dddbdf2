"""What ``GET /health`` and ``netpluginctl status`` report: one check per
part the plugin needs (datastore, host agent, then the backend's own, such
as Docker or Nuage's VRS), each healthy or not with a line of words."""
from __future__ import annotations

import time
from typing import Dict, Tuple

from netplugin import runstate
from netplugin.docker import DockerClient, DockerUnavailable

Check = Tuple[bool, str]


def check_datastore(datastore) -> Check:
    started = time.monotonic()
    try:
        datastore.ping()
    except Exception as exc:  # any failure is the answer, not a crash
        name = getattr(datastore, "name", "datastore")
        text = str(exc)   # the adapters' lines name the datastore and endpoint already
        return False, text if text.startswith(name + " at ") else f"{name} unreachable: {text}"
    return True, (f"{getattr(datastore, 'name', 'datastore')} answered in "
                  f"{(time.monotonic() - started) * 1000:.0f} ms")


def check_docker(endpoint: str, timeout: float) -> Check:
    """``GET /_ping`` on dockerd (unix:// or tcp:// endpoint)."""
    client = DockerClient(endpoint, timeout)
    try:
        client.ping()
    except DockerUnavailable as exc:
        return False, str(exc)
    finally:
        client.close()
    return True, f"dockerd at {endpoint} answers"


def report(backend) -> Tuple[bool, Dict[str, Dict[str, object]]]:
    """(healthy, {check: {"ok": bool, "detail": words}}) for ``backend``."""
    checks: Dict[str, Check] = {"datastore": check_datastore(backend.datastore)}
    if backend.has_agent:
        checks["agent"] = runstate.read_agent_status(backend.config.driver_state_dir)
    checks.update(backend.health_checks())
    out = {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()}
    return all(ok for ok, _ in checks.values()), out
