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
    """One etcd member (v2 API enabled too).  ``tls``: a ``TlsFiles`` whose
    server certificate the client URL serves (client certificates
    required); ``cluster``/``name``: a member of ``EtcdCluster``."""

    kind = "etcd"

    def __init__(self, binary: str = "etcd", tls: "Optional[TlsFiles]" = None,
                 name: str = "default", peer_port: Optional[int] = None,
                 initial_cluster: str = ""):
        super().__init__()
        self.binary = shutil.which(binary) or binary
        self.client_port = free_port()
        self.peer_port = peer_port or free_port()
        self.tls = tls
        self.name = name
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.client_port}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.data_dir = os.path.join(self.dir, "data")

    def argv(self) -> List[str]:
        argv = [self.binary, "--enable-v2=true", "--name", self.name,
                "--data-dir", self.data_dir,
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.initial_cluster,
                "--initial-cluster-state", "new",
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--log-level", "error"]
        if self.tls:
            argv += ["--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key,
                     "--client-cert-auth", "--trusted-ca-file", self.tls.ca]
        return argv

    def _get(self, path: str) -> Optional[bytes]:
        if not self.tls:
            return _http_get(self.url + path)
        import ssl
        ctx = ssl.create_default_context(cafile=self.tls.ca)
        ctx.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        try:
            with urllib.request.urlopen(self.url + path, timeout=1.0, context=ctx) as resp:
                return resp.read() if resp.status == 200 else None
        except OSError:
            return None

    def healthy(self) -> bool:
        if self.name != "default":  # a cluster member: answering is enough
            return self._get("/version") is not None
        body = self._get("/health")
        if not body:
            return False
        try:
            if json.loads(body).get("health") not in (True, "true"):
                return False
        except ValueError:
            return False
        # the v2 API the adapter uses must answer too
        return self._get("/v2/keys/") is not None


class TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate,
    made with openssl in ``directory``; ``other_ca`` signs nothing we use."""

    def __init__(self, directory: str):
        self.dir = directory
        j = lambda name: os.path.join(directory, name)  # noqa: E731
        self.ca, self.ca_key = j("ca.pem"), j("ca-key.pem")
        self.other_ca, self.other_ca_key = j("other-ca.pem"), j("other-ca-key.pem")
        self.server_cert, self.server_key = j("server.pem"), j("server-key.pem")
        self.client_cert, self.client_key = j("client.pem"), j("client-key.pem")
        self.other_client_cert, self.other_client_key = j("other-client.pem"), j("other-client-key.pem")
        self._ca(self.ca, self.ca_key, "netplugin test CA")
        self._ca(self.other_ca, self.other_ca_key, "some other CA")
        self._leaf(self.server_cert, self.server_key, self.ca, self.ca_key, "127.0.0.1",
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth")
        self._leaf(self.client_cert, self.client_key, self.ca, self.ca_key, "netplugin",
                   "extendedKeyUsage=clientAuth")
        self._leaf(self.other_client_cert, self.other_client_key, self.other_ca,
                   self.other_ca_key, "netplugin", "extendedKeyUsage=clientAuth")

    @staticmethod
    def _openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    def _ca(self, cert: str, key: str, cn: str) -> None:
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                      "-out", cert, "-days", "2", "-subj", f"/CN={cn}")

    def _leaf(self, cert: str, key: str, ca: str, ca_key: str, cn: str, ext: str) -> None:
        csr, extfile = cert + ".csr", cert + ".ext"
        with open(extfile, "w") as f:
            f.write(ext.replace("\\n", "\n") + "\n")
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                      "-subj", f"/CN={cn}")
        self._openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
                      "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", extfile)


class EtcdCluster:
    """Three etcd members on loopback ports; ``urls`` lists their client URLs."""

    def __init__(self, size: int = 3):
        ports = [free_port() for _ in range(size)]
        names = [f"m{n}" for n in range(size)]
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(names, ports))
        self.members = [EtcdServer(name=n, peer_port=p, initial_cluster=initial)
                        for n, p in zip(names, ports)]
        self.urls = [m.url for m in self.members]

    def start(self) -> None:
        procs = []
        for m in self.members:   # all at once: a member waits for its peers
            log = open(m.log_path, "ab")
            try:
                m.proc = subprocess.Popen(m.argv(), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, cwd=m.dir)
            finally:
                log.close()
            procs.append(m.proc)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(m.healthy() for m in self.members):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                tails = "\n".join(m.log_tail() for m in self.members)
                self.cleanup()
                raise RuntimeError(f"etcd cluster not healthy:\n{tails}")
            time.sleep(0.1)

    def cleanup(self) -> None:
        for m in self.members:
            m.cleanup()


@contextlib.contextmanager
def run_etcd_cluster(size: int = 3) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


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
def run_etcd(tls: "Optional[TlsFiles]" = None) -> Iterator[EtcdServer]:
    """A private, healthy etcd (v2 API enabled); yields the server object."""
    server = EtcdServer(tls=tls)
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
