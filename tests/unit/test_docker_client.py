"""netplugin.docker: the API version is negotiated with dockerd (not pinned),
the client is made on first use, and every failure is one DockerUnavailable
naming the endpoint and the cause.  Against a small fake dockerd on a unix
socket, through the real docker-py client."""
from __future__ import annotations

import http.server
import json
import socketserver
import threading

import pytest

from netplugin.docker import API_VERSION, DockerClient, DockerUnavailable
from netplugin.health import check_docker


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class FakeDockerd:
    """Answers ``/version`` with ``api_version`` and the GET ``routes``
    (path without the version prefix -> (status, JSON-able body)); records
    every request path as sent."""

    def __init__(self, path: str, api_version: str = "1.47", routes=None):
        self.api_version = api_version
        self.routes = dict(routes or {})
        self.paths = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                fake.paths.append(self.path)
                route = self.path.split("?")[0]
                prefix = f"/v{fake.api_version}"
                if route.startswith(prefix):
                    route = route[len(prefix):]
                if route == "/version":
                    status, body = 200, {"ApiVersion": fake.api_version, "Version": "28.0.0",
                                         "MinAPIVersion": "1.24"}
                elif route == "/_ping":
                    status, body = 200, b"OK"
                else:
                    status, body = fake.routes.get(route, (404, {"message": "no such thing"}))
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(body, bytes)
                                 else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = _Server(path, Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dockerd(tmp_path):
    fake = FakeDockerd(str(tmp_path / "docker.sock"))
    yield fake
    fake.close()


def endpoint(fake: FakeDockerd) -> str:
    return "unix://" + fake.server.server_address


def test_the_version_is_negotiated_not_pinned(dockerd):
    dockerd.routes["/networks/web"] = (200, {"Id": "ab" * 32, "Name": "web"})
    with DockerClient(endpoint(dockerd), 2.0) as docker:
        assert dockerd.paths == []                       # nothing asked before first use
        assert docker.network("web")["Id"] == "ab" * 32
        assert docker.api.api_version == "1.47"
    assert dockerd.paths[0] == "/version"                # unversioned: the negotiation
    assert dockerd.paths[1] == "/v1.47/networks/web"     # then dockerd's own version
    assert API_VERSION == "auto"


def test_an_older_dockerd_is_spoken_to_in_its_version(tmp_path):
    fake = FakeDockerd(str(tmp_path / "old.sock"), api_version="1.41")
    try:
        with DockerClient(endpoint(fake), 2.0) as docker:
            docker.ping()
        assert fake.paths == ["/version", "/v1.41/_ping"]
        assert check_docker(endpoint(fake), 2.0) == (True, f"dockerd at {endpoint(fake)} "
                                                           "answers")
    finally:
        fake.close()


def test_missing_network_is_none_and_errors_name_endpoint_and_cause(dockerd):
    dockerd.routes["/networks/bad"] = (500, {"message": "boom"})
    with DockerClient(endpoint(dockerd), 2.0) as docker:
        assert docker.network("nope") is None
        with pytest.raises(DockerUnavailable) as caught:
            docker.network("bad")
        text = str(caught.value)
        assert text.startswith(f"Docker at {endpoint(dockerd)}: inspect network bad failed:")
        assert "boom" in text
        # after a failure, the next call negotiates on a fresh client
        assert docker.network("nope") is None
    assert dockerd.paths.count("/version") == 2


def test_unreachable_endpoint_is_one_clear_error(tmp_path):
    where = f"unix://{tmp_path}/no-docker.sock"
    docker = DockerClient(where, 1.0)                    # making it asks nothing
    with pytest.raises(DockerUnavailable) as caught:
        docker.network("web")
    text = str(caught.value)
    assert text.startswith(f"cannot reach Docker at {where}: ")
    assert len(text.splitlines()) == 1 and len(text) < 400
    ok, detail = check_docker(where, 1.0)
    assert not ok and detail.startswith(f"cannot reach Docker at {where}: ")


def test_a_timeout_says_timed_out(tmp_path):
    import socket

    path = str(tmp_path / "silent.sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(path)
    silent.listen(4)                                     # accepts, never answers
    try:
        with pytest.raises(DockerUnavailable, match=r"silent\.sock: timed out$"):
            DockerClient("unix://" + path, 0.3).ping()
    finally:
        silent.close()


def test_injected_factory_gets_auto_and_the_timeout():
    made = []

    class Api:
        def ping(self):
            return True

        def close(self):
            made.append("closed")

    def factory(base_url, version, timeout):
        made.append((base_url, version, timeout))
        return Api()

    docker = DockerClient("tcp://docker.invalid:2375", 4.5, factory=factory)
    docker.ping()
    docker.ping()
    docker.close()
    assert made == [("tcp://docker.invalid:2375", "auto", 4.5), "closed"]


def test_the_restarter_asks_through_the_client():
    """netplugin.restarter on DockerClient: a container removed between the
    list and the inspect (404) is skipped, a failed one started again."""
    import docker.errors

    from netplugin.restarter import Restarter

    failed = {"Id": "c1", "Name": "/web",
              "State": {"Running": False, "Error": "NetworkDriver.Join: datastore down"},
              "HostConfig": {"RestartPolicy": {"Name": "always"}, "NetworkMode": "net1"},
              "NetworkSettings": {"Networks": {"net1": {}}}}
    started = []

    class Api:
        def networks(self):
            return [{"Name": "net1", "Id": "n1", "Driver": "calico"}]

        def containers(self, all, filters):
            return [{"Id": "gone"}, {"Id": "c1"}]

        def inspect_container(self, cid):
            if cid == "gone":
                raise docker.errors.NotFound("no such container")
            return failed

        def start(self, cid):
            started.append(cid)

        def close(self):
            pass

    class Store:
        def ping(self):
            pass

    restarter = Restarter("unix:///fake.sock", "calico", Store(), client=Api())
    assert restarter.pass_once() == ["c1"] and started == ["c1"]
    assert restarter.pass_once() == []                  # at most once per backoff
