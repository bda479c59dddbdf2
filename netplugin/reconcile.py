"""The one reconcile loop of the host agents: observe, compute the desired
state, diff, apply; periodic and event-driven runs, and the one backoff.

Owns the loop, its timing and its backoff; the caller owns the four
functions.  Used by every per-host loop: the Calico leak audit, the Calico
policy agent (backends/calico/agent.py) and route agent (routes.py), the
Nuage audit.

``observe()`` reads our own state, ``desired()`` what should exist (asked
after ``observe``, so what appears meanwhile is not a candidate),
``diff(desired, observed)`` returns the changes (falsy: nothing to do) and
``apply(changes)`` makes them.

Two kinds of run:

* a *full* run (``full`` is True while it runs): at start, every
  ``interval`` seconds, sooner when a step asked (``recheck_in``), at once
  after ``kick()`` (e.g. Docker came back), and after a failure: any
  exception in a step is logged and a full run is retried after an
  exponential backoff (``retry`` doubling up to ``max_retry``);
* a *change* run, after ``notify()`` (a watch event, say): ``quiet`` seconds
  after the last notification, at most ``debounce`` seconds after the first
  of a burst (``notify(at_once=True)``: now).  A change run is due whatever
  the backoff (the steps may work from a local copy the events keep); one
  that succeeds does not end a backoff (only a full run does), one that
  fails brings the next full run forward to the backoff.

Every run is counted in the metrics (result, duration, what ``apply`` says
it repaired when it returns ``{what: count}``, and for a run that handled
notifications the lag since the first of them) and reported to the agent's
status (``/health``).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

from netplugin import metrics, runstate

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, name: str, *, observe: Callable[[], Any],
                 desired: Callable[[], Any], diff: Callable[[Any, Any], Any],
                 apply: Callable[[Any], Any], interval: float = 60.0,
                 retry: float = 1.0, max_retry: float = 30.0,
                 quiet: float = 0.0, debounce: float = 0.0):
        if interval <= 0 or retry <= 0 or max_retry < retry:
            raise ValueError("interval and retry must be positive, max_retry >= retry")
        if quiet < 0 or debounce < quiet:
            raise ValueError("quiet must be >= 0, debounce >= quiet")
        self.name = name
        self.observe, self.desired, self.diff, self.apply = observe, desired, diff, apply
        self.interval, self.retry, self.max_retry = interval, retry, max_retry
        self.quiet, self.debounce = quiet, debounce
        self.failures = 0            # consecutive failed runs
        self.repaired: dict = {}     # what the last apply said it changed
        self.runs = 0                # successful runs (tests, logs)
        self.last_error: Optional[str] = None
        self.full = True             # the current (or last) run is a full one
        self._recheck: Optional[float] = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._full_at: Optional[float] = None      # next full run (None: at once)
        self._first: Optional[float] = None        # first notification not yet handled
        self._last: Optional[float] = None         # last one (None: at once)
        self._halted = False

    # -- asked by the steps or other threads -------------------------------------
    def recheck_in(self, seconds: float) -> None:
        """Called from diff/apply: run again after ``seconds`` (if sooner than
        the interval)."""
        if self._recheck is None or seconds < self._recheck:
            self._recheck = max(0.0, seconds)

    def kick(self) -> None:
        """A full run at once."""
        with self._lock:
            self._full_at = time.monotonic()
        self._wake.set()

    def notify(self, at_once: bool = False) -> None:
        """Something changed: a change run after the quiet period (or now)."""
        now = time.monotonic()
        with self._lock:
            if self._first is None:
                self._first = now
                self._last = now
            if at_once:
                self._last = None
            elif self._last is not None:
                self._last = now
        self._wake.set()

    def stop(self) -> None:
        """End ``run`` (as its ``stop`` event would)."""
        self._halted = True
        self._wake.set()

    # -- the runs -------------------------------------------------------------------
    def change_due(self) -> Optional[float]:
        """When the pending notifications are due (monotonic), None if none."""
        with self._lock:
            if self._first is None:
                return None
            if self._last is None:
                return self._first
            return min(self._last + self.quiet, self._first + self.debounce)

    def run_once(self) -> Any:
        """One observe -> desired -> diff -> apply pass; raises what a step raised."""
        observed = self.observe()
        wanted = self.desired()
        changes = self.diff(wanted, observed)
        self.repaired = {}
        if changes:
            done = self.apply(changes)
            if isinstance(done, dict):
                self.repaired = {str(k): int(v) for k, v in done.items()
                                 if isinstance(v, int) and not isinstance(v, bool)}
        self.runs += 1
        return changes

    def backoff(self) -> float:
        """The wait before retrying after ``failures`` consecutive failures."""
        return min(self.retry * 2 ** (max(self.failures, 1) - 1), self.max_retry)

    def next_delay(self, ok: bool) -> float:
        if not ok:
            return self.backoff()
        delay = self.interval
        if self._recheck is not None:
            delay = min(delay, self._recheck)
        return delay

    def step(self, full: bool = True) -> float:
        """Run once (a full or a change run), never raise; return the seconds
        to wait before the next full run."""
        self._recheck = None
        self.full = full
        with self._lock:
            changed_at, self._first, self._last = self._first, None, None
        started = time.monotonic()
        try:
            self.run_once()
        except Exception as exc:  # any step: log, back off, retry
            self.failures += 1
            now = time.monotonic()
            metrics.observe_reconcile(self.name, now - started, False)
            delay = self.next_delay(False)
            with self._lock:
                if full or self._full_at is None or now + delay < self._full_at:
                    self._full_at = now + delay
                else:                       # an earlier full run stays due
                    delay = max(0.0, self._full_at - now)
            text = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
            if text != self.last_error or log.isEnabledFor(logging.DEBUG):
                log.warning("%s: %s; retrying in %.1f s", self.name, text, delay,
                            exc_info=log.isEnabledFor(logging.DEBUG))
            self.last_error = text
            runstate.report(self.name, False, text)
            return delay
        now = time.monotonic()
        metrics.observe_reconcile(self.name, now - started, True,
                                  sorted(self.repaired.items()))
        if changed_at is not None:
            metrics.observe_sync_lag(self.name, now - changed_at)
        runstate.report(self.name, True)
        with self._lock:
            if full:
                if self.failures:
                    log.info("%s: succeeded again after %d failed run(s)", self.name,
                             self.failures)
                self.failures = 0
                self.last_error = None
                delay = self.next_delay(True)
                self._full_at = now + delay
                return delay
            if self._recheck is not None and (self._full_at is None
                                              or now + self._recheck < self._full_at):
                self._full_at = now + self._recheck
                return self._recheck
            return max(0.0, self._full_at - now) if self._full_at is not None else 0.0

    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set (or ``self.stop()``): a full run at once, then
        full runs every interval (or backoff), change runs when due."""
        finished = threading.Event()

        def wake_on_stop() -> None:      # ends with the run (stop() may end it first)
            while not stop.wait(0.5):
                if finished.is_set():
                    return
            self._wake.set()

        threading.Thread(target=wake_on_stop, name=f"{self.name}-stop", daemon=True).start()
        with self._lock:
            if self._full_at is None:
                self._full_at = time.monotonic()
        try:
            while not (stop.is_set() or self._halted):
                self._wake.clear()   # a notify/kick from here on wakes the wait below
                now = time.monotonic()
                change = self.change_due()
                with self._lock:
                    full_at = self._full_at if self._full_at is not None else now
                if full_at <= now:
                    self.step(full=True)
                elif change is not None and change <= now:
                    self.step(full=False)
                else:
                    self._wake.wait(min(full_at, change if change is not None else full_at)
                                    - now)
        finally:
            finished.set()
