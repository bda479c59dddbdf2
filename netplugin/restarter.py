"""Containers Docker gave up on because this plugin failed them: started
again once the plugin can serve them.

dockerd starts restart-policy containers once at boot and never retries a
start that failed (it only restarts containers that exit).  When the plugin's
datastore was down at that moment, CreateEndpoint answered an ``Err`` and the
container stays exited.  In the host agent, this loop looks every few
seconds, while the datastore answers, for containers with restart policy
``always`` or ``unless-stopped`` whose last start failed with an error of a
plugin call (Docker keeps it in ``State.Error``) on a network of this
driver, and starts them again, each at most once per ``backoff`` seconds.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Dict, List, Optional

from netplugin.docker import DockerClient

log = logging.getLogger(__name__)

RESTART_POLICIES = ("always", "unless-stopped")
PLUGIN_ERROR_MARKS = ("NetworkDriver.", "IpamDriver.")


def should_restart(inspected: dict, our_networks: set) -> bool:
    """A container's inspect JSON: restarted by this loop?"""
    state = inspected.get("State") or {}
    policy = ((inspected.get("HostConfig") or {}).get("RestartPolicy") or {}).get("Name")
    if policy not in RESTART_POLICIES or state.get("Running") or state.get("Restarting"):
        return False
    error = state.get("Error") or ""
    if not any(mark in error for mark in PLUGIN_ERROR_MARKS):
        return False
    wanted = (inspected.get("NetworkSettings") or {}).get("Networks") or {}
    mode = (inspected.get("HostConfig") or {}).get("NetworkMode") or ""
    return bool(our_networks & (set(wanted) | {mode}))


class Restarter:
    def __init__(self, endpoint: str, driver: str, datastore, timeout: float = 5.0,
                 interval: float = 5.0, backoff: float = 30.0, client=None):
        self.endpoint = endpoint
        self.driver = driver
        self.datastore = datastore
        self.timeout = timeout
        self.interval = interval
        self.backoff = backoff
        self.docker = DockerClient(endpoint, timeout, factory=None if client is None
                                   else lambda *_: client)
        self._tried: Dict[str, float] = {}

    def pass_once(self) -> List[str]:
        """One look; returns the IDs of the containers started."""
        try:
            self.datastore.ping()
        except Exception:
            return []             # they would fail again
        call = self.docker.call
        ours = set()
        for net in call("list networks", lambda api: api.networks()):
            if net.get("Driver") == self.driver:
                ours |= {net.get("Name"), net.get("Id")}
        if not ours:
            return []
        started = []
        now = time.monotonic()
        for summary in call("list containers", lambda api: api.containers(
                all=True, filters={"status": ["exited", "created"]})):
            cid = summary.get("Id")
            if not cid or now - self._tried.get(cid, -self.backoff) < self.backoff:
                continue
            try:
                inspected = call(f"inspect container {cid[:12]}",
                                 lambda api: api.inspect_container(cid), not_found=None)
            except Exception:
                continue
            if inspected is None:     # removed meanwhile
                continue
            if not should_restart(inspected, ours):
                continue
            self._tried[cid] = now
            try:
                call(f"start container {cid[:12]}", lambda api: api.start(cid))
                started.append(cid)
                log.info("started container %s again: Docker gave up on it when this "
                         "plugin failed it (%s)", (inspected.get("Name") or cid).lstrip("/"),
                         (inspected.get("State") or {}).get("Error"))
            except Exception as exc:
                log.warning("cannot start container %s again: %s", cid[:12], exc)
        return started

    def run(self, stop: threading.Event) -> None:
        warned = False
        while not stop.wait(self.interval):
            try:
                self.pass_once()
                warned = False
            except Exception as exc:   # Docker not up yet (boot): try again later
                if not warned:
                    log.info("cannot ask Docker at %s for containers to restart yet: %s",
                             self.endpoint, exc)
                    warned = True
                self.docker.close()


def start_thread(endpoint: Optional[str], driver: str, datastore, stop: threading.Event,
                 **kw) -> Optional[threading.Thread]:
    if not endpoint:
        return None
    thread = threading.Thread(target=Restarter(endpoint, driver, datastore, **kw).run,
                              args=(stop,), name="restarter", daemon=True)
    thread.start()
    return thread
