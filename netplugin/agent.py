"""The per-host agent process (``netplugin --agent -f FILE``).

Some backends keep the host in line with the datastore continuously (the
Calico backend enforces network isolation, like Felix).  That work must run
once per host, not once per worker serving Docker, so the launcher starts it
as its own process beside gunicorn: it dies with the launcher (parent-death
signal), stops on SIGTERM, and restarts ``run_agent`` after a crash.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import List, Optional

from netplugin.config import Config

log = logging.getLogger("netplugin.agent")

PR_SET_PDEATHSIG = 1
MAX_BACKOFF = 10.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def spawn(config_path: str) -> subprocess.Popen:
    """Start the agent for ``config_path`` as a child of this process."""
    argv: List[str] = [sys.executable, "-m", "netplugin", "--agent", "-f", config_path]
    return subprocess.Popen(argv, preexec_fn=_die_with_parent)


def stop(proc: Optional[subprocess.Popen], timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def run(cfg: Config, stop_event: Optional[threading.Event] = None) -> int:
    """Run the backend's agent until SIGTERM/SIGINT (or ``stop_event``)."""
    from netplugin.cli import build_backend

    stop_event = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop_event.set())
    log.info("agent for backend %s starting (pid %d)", cfg.backend, os.getpid())
    backoff = 0.5
    while not stop_event.is_set():
        backend = build_backend(cfg)
        try:
            backend.run_agent(stop_event)
            backoff = 0.5
        except Exception:
            log.exception("agent crashed; restarting in %.1f s", backoff)
            stop_event.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            try:
                backend.stop()
                backend.datastore.close()
            except Exception:  # pragma: no cover - best effort
                log.debug("agent cleanup failed", exc_info=True)
    log.info("agent stopped")
    return 0
