"""The per-host agent process (``netplugin --agent -f FILE``): runs the
backend's HostAgent role once per host, supervised, restarted after a crash.

Some backends keep the host in line with the datastore continuously (the
Calico backend enforces network isolation, like Felix).  That work must run
once per host, not once per worker serving Docker, so the launcher starts it
as its own process beside gunicorn: it dies with the launcher (parent-death
signal), stops on SIGTERM, and restarts its backend (built anew) after a
crash, also of building it, with exponential backoff (0.5 s doubling to 10 s).
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

from netplugin import runstate
from netplugin.config import Config

log = logging.getLogger("netplugin.agent")

PR_SET_PDEATHSIG = 1
INITIAL_BACKOFF = 0.5
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


def serve_operator_routes(cfg: Config, stop_event: threading.Event) -> None:
    """``/metrics`` and ``/health`` on ``metrics_address`` (TCP), from this
    one process per host; a thread until ``stop_event``."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from netplugin.app import create_operator_app
    from netplugin.config import split_address
    from netplugin.runtime import build_backend

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):  # scrapes are not worth a log line each
            pass

    host, port = split_address(cfg.metrics_address)
    try:
        server = make_server(host, port, create_operator_app(build_backend(cfg)),
                             handler_class=QuietHandler)
    except OSError as exc:
        log.error("cannot serve metrics on %s: %s", cfg.metrics_address, exc)
        return
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    threading.Thread(target=lambda: (stop_event.wait(), server.shutdown()), daemon=True).start()
    log.info("metrics and health on http://%s/metrics, /health", cfg.metrics_address)


def run(cfg: Config, stop_event: Optional[threading.Event] = None) -> int:
    """Run the backend's agent until SIGTERM/SIGINT (or ``stop_event``)."""
    from netplugin.runtime import build_backend

    stop_event = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop_event.set())
    log.info("agent for backend %s starting (pid %d)", cfg.backend, os.getpid())
    runstate.watch_log_level(cfg.driver_state_dir, stop_event)
    status = runstate.AgentStatus(cfg.driver_state_dir)
    runstate.set_agent_status(status)
    threading.Thread(target=status.run, args=(stop_event,), name="agent-status",
                     daemon=True).start()
    if cfg.metrics_address:
        serve_operator_routes(cfg, stop_event)
    backoff = INITIAL_BACKOFF
    while not stop_event.is_set():
        backend = None
        try:
            # building it may fail too (datastore config, a backend bug): the
            # agent retries, it never exits for good
            backend = build_backend(cfg)
            host_agent = backend.host_agent()
            runstate.report("agent", True, "running")
            if host_agent is None:     # nothing to do on this host
                stop_event.wait()
            else:
                host_agent.run(stop_event)
            backoff = INITIAL_BACKOFF
        except Exception as exc:
            runstate.report("agent", False, f"crashed: {exc}")
            log.exception("agent crashed; restarting in %.1f s", backoff)
            stop_event.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
        finally:
            if backend is not None:
                try:
                    backend.stop()
                    backend.datastore.close()
                except Exception:  # pragma: no cover - best effort
                    log.debug("agent cleanup failed", exc_info=True)
    log.info("agent stopped")
    return 0
