"""Host-local run state shared by a plugin's processes: the agent's status
file (liveness and in-sync per loop) and the runtime log level.

Owns two small files in the plugin's state directory (``state_dir/<driver>``):
``agent-status.json``, rewritten by the host agent every few seconds, read by
``/health`` and ``netpluginctl status``; and ``log-level``, written by
``netpluginctl log-level`` or a SIGHUP of the launcher and applied by every
process within half a second.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from typing import Any, Dict, Optional, Tuple

log = logging.getLogger(__name__)

STATUS_FILE = "agent-status.json"
LEVEL_FILE = "log-level"
LEVELS = ("debug", "info", "warning", "error", "critical")
STATUS_INTERVAL = 2.0


def _write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------
# the agent's status


class AgentStatus:
    """In the agent process: loops ``report`` how their last pass went; a
    thread rewrites the status file every ``interval`` seconds (the heartbeat)."""

    def __init__(self, state_dir: str, interval: float = STATUS_INTERVAL):
        self.path = os.path.join(state_dir, STATUS_FILE)
        self.interval = interval
        self._loops: Dict[str, Dict[str, Any]] = {}
        self._lock = threading.Lock()

    def report(self, loop: str, ok: bool, detail: str = "") -> None:
        with self._lock:
            self._loops[loop] = {"ok": bool(ok), "detail": detail, "time": time.time()}

    def write(self) -> None:
        with self._lock:
            body = {"pid": os.getpid(), "time": time.time(), "interval": self.interval,
                    "loops": dict(self._loops)}
        _write_atomically(self.path, json.dumps(body, sort_keys=True))

    def run(self, stop: threading.Event) -> None:
        while True:
            try:
                self.write()
            except OSError as exc:
                log.warning("cannot write %s: %s", self.path, exc)
            if stop.wait(self.interval):
                return


_current: Optional[AgentStatus] = None


def set_agent_status(status: Optional[AgentStatus]) -> None:
    global _current
    _current = status


def report(loop: str, ok: bool, detail: str = "") -> None:
    """How a pass of an agent loop went (a no-op outside the agent process)."""
    if _current is not None:
        _current.report(loop, ok, detail)


def read_agent_status(state_dir: str) -> Tuple[bool, str]:
    """(healthy, words): the agent wrote its status recently and every loop's
    last pass succeeded."""
    path = os.path.join(state_dir, STATUS_FILE)
    try:
        with open(path) as f:
            body = json.load(f)
        age = time.time() - float(body["time"])
        interval = float(body.get("interval", STATUS_INTERVAL))
        loops = body.get("loops") or {}
    except FileNotFoundError:
        return False, "the host agent has not reported yet"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"the host agent's status cannot be read: {exc}"
    if age > 3 * interval + 5:
        return False, f"the host agent has not reported for {age:.0f} s"
    failing = sorted(name for name, st in loops.items() if not st.get("ok"))
    if failing:
        details = "; ".join(f"{n}: {loops[n].get('detail') or 'failed'}" for n in failing)
        return False, f"host agent out of sync ({details})"
    names = ", ".join(sorted(loops)) or "no loop yet"
    return True, f"host agent alive (pid {body.get('pid')}), in sync: {names}"


# --------------------------------------------------------------------------
# the log level


def level_path(state_dir: str) -> str:
    return os.path.join(state_dir, LEVEL_FILE)


def set_log_level(state_dir: str, level: str) -> None:
    """Ask every process of the plugin to log at ``level`` from now on."""
    level = level.strip().lower()
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    _write_atomically(level_path(state_dir), level + "\n")


def read_log_level(state_dir: str) -> Optional[str]:
    try:
        with open(level_path(state_dir)) as f:
            level = f.read().strip().lower()
    except OSError:
        return None
    return level if level in LEVELS else None


def watch_log_level(state_dir: str, stop: Optional[threading.Event] = None,
                    interval: float = 0.5) -> threading.Thread:
    """A daemon thread that applies the ``log-level`` file to this process's
    root logger whenever it changes (one per process: a second call returns
    the running one)."""
    running = _watchers.get((os.getpid(), state_dir))
    if running is not None and running.is_alive():
        return running
    stop = stop or threading.Event()
    path = level_path(state_dir)

    def loop():
        seen = None
        while not stop.is_set():
            try:
                stamp = os.stat(path).st_mtime_ns
            except OSError:
                stamp = None
            if stamp is not None and stamp != seen:
                seen = stamp
                level = read_log_level(state_dir)
                if level is not None:
                    root = logging.getLogger()
                    if root.level != getattr(logging, level.upper()):
                        root.setLevel(level.upper())
                        log.warning("log level is now %s", level)
            stop.wait(interval)

    thread = threading.Thread(target=loop, name="log-level", daemon=True)
    thread.start()
    _watchers[(os.getpid(), state_dir)] = thread
    return thread


_watchers: Dict[Tuple[int, str], threading.Thread] = {}
