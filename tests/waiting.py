"""Polling for tests: wait until a condition holds (what Docker, the plugin
or the kernel does happens a moment after the call that asked for it)."""
from __future__ import annotations

import time


def wait_for(fn, timeout: float = 30.0, interval: float = 0.1):
    """Call ``fn`` until it returns something true or ``timeout`` seconds
    pass; its last value either way (so ``assert wait_for(...)`` fails with
    the state seen last)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
