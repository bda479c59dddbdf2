"""The policy barrier: the request workers tell this host's policy agent about a new endpoint.
Owns the local socket between the workers and the agent (its path, wire format, bounds).

Without it the agent learns of an endpoint from the datastore's watch and of
which interfaces share a container from a link poll: under load either can lag
Docker's start of the container (or a ``network connect``), and the
container's first packets hit the table's drop for unknown ``cali*``
interfaces.  So CreateEndpoint ``notify``s the agent (it reads the endpoint
first-hand and applies at once, without its quiet period), and Join, once its
veth is ready, ``wait_applied``: the agent answers when its applied table has
that endpoint's chain with its container's addresses, or after ``TIMEOUT``
seconds.  The socket lives in the driver's 0700 state directory and is itself
0600 (root only).  No agent listening (not started yet, another backend in a
test) or a timeout only costs the wait: no call fails on it.

Wire format: one request line ``{"key": "<endpoint key>", "wait": true|false}``,
one answer line ``ok``, ``queued`` (no wait), ``timeout`` or ``error <text>``.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

log = logging.getLogger(__name__)

SOCKET = "policy.sock"
TIMEOUT = 5.0          # the longest Join waits for the agent
MAX_LINE = 4096
WORKERS = 32           # requests served at once (more wait their turn)


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET)


def wait_applied(state_dir: str, key: str, timeout: float = TIMEOUT) -> str:
    """Ask the agent to enforce ``key`` and wait; its answer (``ok``,
    ``timeout``, ...), or ``no agent`` when nothing listens."""
    return _ask(state_dir, key, True, timeout)


def notify(state_dir: str, key: str) -> str:
    """Tell the agent ``key`` is new, without waiting for its table."""
    return _ask(state_dir, key, False, TIMEOUT)


def _ask(state_dir: str, key: str, wait: bool, timeout: float) -> str:
    path = socket_path(state_dir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout + 1.0)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return "no agent"
        s.sendall(json.dumps({"key": key, "wait": wait}).encode() + b"\n")
        answer = _read_line(s)
        return answer or "no answer"
    except OSError as exc:
        return f"error {exc}"
    finally:
        s.close()


def _read_line(s: socket.socket) -> str:
    data = b""
    while b"\n" not in data and len(data) < MAX_LINE:
        chunk = s.recv(MAX_LINE)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()


class BarrierServer:
    """In the agent: answers each request with ``handler(key, timeout)``
    (True: applied) on one of at most ``WORKERS`` reused threads until
    ``stop``; a request without wait is answered ``queued`` first, then
    ``handler(key, None)`` runs.  Threads are reused, not made per request:
    the handler reads the datastore, and a datastore may keep a connection per
    thread (the embedded one does: a thread per request leaked one each)."""

    def __init__(self, state_dir: str, handler: Callable[[str, Optional[float]], bool],
                 timeout: float = TIMEOUT):
        self.path = socket_path(state_dir)
        self.handler = handler
        self.timeout = timeout
        self._sock: Optional[socket.socket] = None

    def start(self, stop: threading.Event) -> bool:
        """Bind and serve; False (logged) when the socket cannot be made."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            try:
                os.unlink(self.path)        # a previous agent's
            except FileNotFoundError:
                pass
            old = os.umask(0o177)
            try:
                s.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            s.listen(64)
            s.settimeout(0.5)
        except OSError as exc:
            s.close()
            log.warning("no policy barrier socket at %s (%s): new containers may "
                        "wait for the datastore's watch", self.path, exc)
            return False
        self._sock = s
        pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="policy-barrier-req")
        threading.Thread(target=self._accept, args=(s, stop, pool), name="policy-barrier",
                         daemon=True).start()
        return True

    def _accept(self, s: socket.socket, stop: threading.Event,
                pool: ThreadPoolExecutor) -> None:
        try:
            while not stop.is_set():
                try:
                    conn, _ = s.accept()
                except socket.timeout:
                    continue
                except OSError:
                    if stop.is_set():
                        break
                    continue
                pool.submit(self._serve, conn)
        finally:
            pool.shutdown(wait=False)
            s.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(self.timeout + 1.0)
                try:
                    req = json.loads(_read_line(conn))
                    key, wait = req["key"], req.get("wait", True)
                    if not isinstance(key, str) or not key or len(key) > 1024 \
                            or not isinstance(wait, bool):
                        raise ValueError("bad key")
                except (ValueError, KeyError, TypeError, AttributeError):
                    conn.sendall(b"error bad request\n")
                    return
                if not wait:
                    conn.sendall(b"queued\n")
                try:
                    ok = self.handler(key, self.timeout if wait else None)
                    if not wait:
                        return
                except Exception as exc:    # answer, never kill the agent
                    log.exception("policy barrier for %s failed", key)
                    conn.sendall(f"error {exc}\n".encode())
                    return
                conn.sendall(b"ok\n" if ok else b"timeout\n")
            except OSError:
                pass                        # the worker gave up
