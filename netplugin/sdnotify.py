"""systemd readiness (``Type=notify``): ``READY=1`` on ``$NOTIFY_SOCKET``
once the plugin socket answers ``Plugin.Activate``, so units ordered
``Before=docker.service`` really are up when dockerd starts."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

from netplugin import unixhttp

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send ``message`` to systemd; False when not started by systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]          # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(path)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", path, exc)
            return False
    return True


def notify_when_answering(socket_path: str, timeout: float = 120.0) -> threading.Thread:
    """A thread that waits until ``socket_path`` answers Plugin.Activate,
    then sends READY=1 (nothing without ``$NOTIFY_SOCKET``)."""
    def wait_and_notify():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status, _ = unixhttp.post(socket_path, "/Plugin.Activate", b"", timeout=2)
                if status == 200:
                    notify(f"READY=1\nSTATUS=serving on {socket_path}\nMAINPID={os.getpid()}")
                    return
            except OSError:
                pass
            time.sleep(0.05)
        log.error("the plugin socket %s did not answer within %.0f s", socket_path, timeout)

    thread = threading.Thread(target=wait_and_notify, name="sd-notify", daemon=True)
    if os.environ.get("NOTIFY_SOCKET"):
        thread.start()
    return thread
