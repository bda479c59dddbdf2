"""Real etcd / consul servers for the datastore tests (no mocks).

Each server binds to 127.0.0.1 only, on free ports, with its data in a fresh
temporary directory; it is killed by PID and its directory removed when the
``with`` block (or the fixture) ends, also when the test fails.

Fixtures: ``etcd_endpoint`` (one etcd for the whole session, its URL) and
``consul_address`` (one consul agent, "127.0.0.1:port"; the tests that use it
are skipped when no ``consul`` binary is on PATH).  ``run_etcd()`` gives a
private etcd that a test may ``stop()`` and ``start()`` again.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator, List, Optional

import pytest

START_TIMEOUT = 20.0  # seconds a server gets to become healthy
NO_CONSUL = "no consul binary on PATH (consul tests run when one is installed)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_get(url: str, timeout: float = 1.0) -> Optional[bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read() if resp.status == 200 else None
    except OSError:
        return None


class _Server:
    """A server process started from ``argv()``, killed by PID on ``stop()``."""

    kind = "server"

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix=f"netplugin-{self.kind}-")
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = os.path.join(self.dir, "server.log")

    def argv(self) -> List[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def healthy(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout: float = START_TIMEOUT) -> None:
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.dir)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.kind} not healthy within {timeout:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Kill the server process (by its PID) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class EtcdServer(_Server):
    kind = "etcd"

    def __init__(self, binary: str = "etcd"):
        super().__init__()
        self.binary = shutil.which(binary) or binary
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.data_dir = os.path.join(self.dir, "data")

    def argv(self) -> List[str]:
        return [self.binary, "--enable-v2=true", "--name", "default",
                "--data-dir", self.data_dir,
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", f"default={self.peer_url}",
                "--log-level", "error"]

    def healthy(self) -> bool:
        body = _http_get(self.url + "/health")
        if not body:
            return False
        try:
            if json.loads(body).get("health") not in (True, "true"):
                return False
        except ValueError:
            return False
        # the v2 API the adapter uses must answer too
        return _http_get(self.url + "/v2/keys/") is not None


class ConsulServer(_Server):
    kind = "consul"

    def __init__(self, binary: str = "consul"):
        super().__init__()
        self.binary = shutil.which(binary) or binary
        self.http_port = free_port()
        self.address = f"127.0.0.1:{self.http_port}"

    def argv(self) -> List[str]:
        # -dev keeps its state in memory; every other port is moved off the
        # defaults (or disabled) so parallel runs do not collide.
        return [self.binary, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
                "-http-port", str(self.http_port), "-dns-port", "-1", "-grpc-port", "-1",
                "-serf-lan-port", str(free_port()), "-serf-wan-port", str(free_port()),
                "-server-port", str(free_port()), "-log-level", "error"]

    def healthy(self) -> bool:
        leader = _http_get(f"http://{self.address}/v1/status/leader")
        if not leader or leader.strip() in (b'""', b""):
            return False
        return _kv_answers(self.address)


def _kv_answers(address: str) -> bool:
    """The KV endpoint answers (404 for a missing key counts)."""
    try:
        urllib.request.urlopen(f"http://{address}/v1/kv/netplugin-health-probe", timeout=1.0)
        return True
    except urllib.error.HTTPError as e:
        return e.code == 404
    except OSError:
        return False


@contextlib.contextmanager
def run_etcd() -> Iterator[EtcdServer]:
    """A private, healthy etcd (v2 API enabled); yields the server object."""
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@contextlib.contextmanager
def run_consul() -> Iterator[ConsulServer]:
    """A private consul dev agent; skips the test when there is no binary."""
    if shutil.which("consul") is None:
        pytest.skip(NO_CONSUL)
    server = ConsulServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def etcd_endpoint() -> Iterator[str]:
    """URL of an etcd shared by the session's tests (etcd must be installed)."""
    with run_etcd() as server:
        yield server.url


@pytest.fixture(scope="session")
def consul_address() -> Iterator[str]:
    """"127.0.0.1:port" of a consul agent shared by the session's tests."""
    with run_consul() as server:
        yield server.address


# -- servers that misbehave, for the "unreachable" tests --------------------

@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """"127.0.0.1:port" of a socket that accepts connections (in the kernel's
    backlog) but never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def garbage_server(status: str = "200 OK",
                   body: bytes = b"<html>this is not a datastore</html>") -> Iterator[str]:
    """"127.0.0.1:port" of an HTTP server that answers every request with
    ``status`` and ``body`` (not what a datastore says)."""
    import socketserver
    import threading

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            length = 0
            while True:
                line = self.rfile.readline(65537)
                if not line or line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if length:
                self.rfile.read(length)
            self.wfile.write(f"HTTP/1.1 {status}\r\nContent-Type: text/html\r\n"
                             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                             .encode("latin-1") + body)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
