"""Progress of long command-line operations: a line rewritten in place on a
terminal (``pool remove: 12/40 blocks``), nothing at all in scripts (output
not a terminal, or ``--json``)."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(self, label: str, total: Optional[int] = None, unit: str = "",
                 stream: Optional[TextIO] = None, enabled: Optional[bool] = None,
                 every: float = 0.1):
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = isatty() if enabled is None else enabled
        self.every = every
        self.done = 0
        self._shown = 0.0
        self._width = 0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self._shown >= self.every
                             or (self.total is not None and self.done >= self.total)):
            self._shown = now
            self._show()

    def _show(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        text = f"{self.label}: {self.done}{of}{' ' + self.unit if self.unit else ''}"
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
