"""Prometheus metrics of every netplugin process (prometheus_client).
Owns every metric name and the multiprocess aggregation; callers only observe.

Owns the metric objects and how they are exposed.  Under ``./plugin`` the
processes of one plugin (gunicorn workers, the host agent) share one
multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``, set by the launcher
before any of them imports prometheus_client), so a scrape of any of them
shows the sum of all.  Elsewhere (tests, ``--audit``) the default in-process
registry is used.  State that is cheaper to read than to count (endpoints,
networks, pool usage) comes from collectors a backend hands to ``render``,
evaluated at scrape time.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Tuple

from prometheus_client import (
    CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest,
    multiprocess)

#: Set by the launcher (netplugin.cli) before any process imports this module.
ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

CALL_SECONDS = Histogram(
    "netplugin_call_duration_seconds", "Time to answer one Docker plugin call",
    ["call"], buckets=LATENCY_BUCKETS)
CALL_ERRORS = Counter(
    "netplugin_call_errors_total", "Plugin calls answered with an Err, by kind of error",
    ["call", "kind"])
DATASTORE_OPS = Counter(
    "netplugin_datastore_operations_total",
    "Datastore operations by kind (read, write, delete), operation and result",
    ["kind", "op", "result"])
RECONCILE_RUNS = Counter(
    "netplugin_reconcile_runs_total", "Reconciler passes by loop and result",
    ["loop", "result"])
RECONCILE_SECONDS = Histogram(
    "netplugin_reconcile_duration_seconds", "Duration of one reconciler pass",
    ["loop"], buckets=LATENCY_BUCKETS)
RECONCILE_REPAIRS = Counter(
    "netplugin_reconcile_repairs_total", "What reconciler passes changed, by loop and kind",
    ["loop", "what"])
SYNC_LAG = Histogram(
    "netplugin_agent_sync_lag_seconds",
    "Time from a datastore change reaching the host agent to the host being in line "
    "(routes, nftables)", ["agent"], buckets=LATENCY_BUCKETS)


def observe_call(call: str, seconds: float, error_kind: Optional[str] = None) -> None:
    CALL_SECONDS.labels(call).observe(seconds)
    if error_kind is not None:
        CALL_ERRORS.labels(call, error_kind).inc()


def observe_datastore(kind: str, op: str, result: str) -> None:
    DATASTORE_OPS.labels(kind, op, result).inc()


def observe_reconcile(loop: str, seconds: float, ok: bool,
                      repairs: Iterable[Tuple[str, int]] = ()) -> None:
    RECONCILE_RUNS.labels(loop, "ok" if ok else "error").inc()
    RECONCILE_SECONDS.labels(loop).observe(seconds)
    for what, count in repairs:
        if count:
            RECONCILE_REPAIRS.labels(loop, what).inc(count)


def observe_sync_lag(agent: str, seconds: float) -> None:
    SYNC_LAG.labels(agent).observe(max(0.0, seconds))


def process_dead(pid: int) -> None:
    """Forget a finished process's live values (gunicorn's child_exit)."""
    if os.environ.get(ENV_DIR):
        multiprocess.mark_process_dead(pid)


def render(extra: Iterable[Callable[[], Iterable]] = ()) -> Tuple[bytes, str]:
    """(exposition text, content type) of every process's metrics plus the
    collectors ``extra`` (callables yielding prometheus_client metric families)."""
    if os.environ.get(ENV_DIR):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    for collect in extra:
        registry.register(_Callable(collect))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Forward:
    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()


class _Callable:
    def __init__(self, fn):
        self.fn = fn

    def collect(self):
        return list(self.fn())
