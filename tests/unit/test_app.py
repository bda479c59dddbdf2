"""The Flask app: every protocol call is routed, errors are JSON, it keeps serving."""
import json

import pytest

from netplugin import protocol as p
from netplugin.app import create_app
from netplugin.backend import Backend, IpamDriver, NetworkDriver
from netplugin.errors import NotFound

NID = "n" * 64
EID = "e" * 64


class RecordingBackend(Backend, NetworkDriver, IpamDriver):
    """A backend of our own interface that records calls (no Docker, no store);
    its IpamDriver role is offered only with ``ipam``."""
    name = "recording"

    def __init__(self, ipam=False):
        super().__init__(config=None, datastore=None)
        self.implements_ipam = ipam
        self.calls = []

    def create_network(self, req):
        self.calls.append(("create_network", req))

    def delete_network(self, req):
        raise NotFound(f"network {req.network_id[:5]} is unknown")

    def create_endpoint(self, req):
        return p.CreateEndpointResponse(mac_address="ee:ee:ee:ee:ee:ee")

    def join(self, req):
        return p.JoinResponse("tmp1", "eth", gateway="169.254.1.1")

    def leave(self, req):
        raise RuntimeError("boom")

    def get_default_address_spaces(self):
        return p.AddressSpaces("L", "G")


@pytest.fixture
def client():
    backend = RecordingBackend()
    app = create_app(backend, "local")
    c = app.test_client()
    c.backend = backend
    return c


def post(client, path, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body) if body is not None else b"")
    r = client.post(path, data=data)  # Docker sends no Content-Type
    return r.status_code, json.loads(r.data)


def test_activate_and_capabilities(client):
    assert post(client, "/Plugin.Activate") == (200, {"Implements": ["NetworkDriver"]})
    assert post(client, "/NetworkDriver.GetCapabilities") == (
        200, {"Scope": "local", "ConnectivityScope": "local", "GwAllocChecker": True})
    ipam = create_app(RecordingBackend(ipam=True), "global").test_client()
    assert post(ipam, "/Plugin.Activate")[1]["Implements"] == ["NetworkDriver", "IpamDriver"]
    assert post(ipam, "/IpamDriver.GetDefaultAddressSpaces") == (
        200, {"LocalDefaultAddressSpace": "L", "GlobalDefaultAddressSpace": "G"})


def test_create_network_routed_with_typed_request(client):
    status, body = post(client, "/NetworkDriver.CreateNetwork", {
        "NetworkID": NID, "Options": {}, "IPv4Data": [{"Pool": "10.1.0.0/16"}]})
    assert (status, body) == (200, {})
    name, req = client.backend.calls[0]
    assert isinstance(req, p.CreateNetworkRequest) and req.ipv4_data[0].pool == "10.1.0.0/16"


def test_every_protocol_call_answers_json(client):
    for path in ["/NetworkDriver.DiscoverNew", "/NetworkDriver.DiscoverDelete"]:
        assert post(client, path, {"DiscoveryType": 1, "DiscoveryData": {}}) == (200, {})
    ep = {"NetworkID": NID, "EndpointID": EID}
    assert post(client, "/NetworkDriver.EndpointOperInfo", ep) == (200, {"Value": {}})
    assert post(client, "/NetworkDriver.ProgramExternalConnectivity", ep) == (200, {})
    assert post(client, "/NetworkDriver.RevokeExternalConnectivity", ep) == (200, {})
    assert post(client, "/NetworkDriver.AllocateNetwork", {"NetworkID": NID}) == (
        200, {"Options": {}})
    assert post(client, "/NetworkDriver.FreeNetwork", {"NetworkID": NID}) == (200, {})
    assert post(client, "/NetworkDriver.CreateEndpoint", {**ep, "Interface": {
        "Address": "10.1.0.2/16"}}) == (200, {"Interface": {"MacAddress": "ee:ee:ee:ee:ee:ee"}})
    status, body = post(client, "/NetworkDriver.Join", {**ep, "SandboxKey": "/x"})
    assert status == 200 and body["InterfaceName"] == {"SrcName": "tmp1", "DstPrefix": "eth"}


@pytest.mark.parametrize("path, raw, needle", [
    ("/NetworkDriver.CreateNetwork", b"{not json", "not valid JSON"),
    ("/NetworkDriver.CreateNetwork", b"", "NetworkID is required"),
    ("/NetworkDriver.CreateNetwork", b'"a string"', "must be a JSON object"),
    ("/NetworkDriver.CreateNetwork", b'{"NetworkID": ["x"]}', "NetworkID must be a string"),
    ("/NetworkDriver.Join", b'{"NetworkID": "a", "EndpointID": "b"}', "SandboxKey"),
    ("/NetworkDriver.DeleteNetwork", json.dumps({"NetworkID": NID}).encode(), "is unknown"),
    ("/IpamDriver.RequestPool", b"{}", "does not offer an IPAM driver"),
])
def test_errors_are_json_err(client, path, raw, needle):
    status, body = post(client, path, raw=raw)
    assert status == 500
    assert needle in body["Err"] and body["Err"] == body["Error"]


def test_backend_crash_is_reported_and_serving_continues(client):
    status, body = post(client, "/NetworkDriver.Leave", {"NetworkID": NID, "EndpointID": EID})
    assert status == 500 and "internal error" in body["Err"] and "boom" in body["Err"]
    assert post(client, "/Plugin.Activate")[0] == 200


def test_unknown_call_and_wrong_method(client):
    status, body = post(client, "/NetworkDriver.Frobnicate", {})
    assert status == 404 and "unknown plugin call" in body["Err"]
    r = client.get("/NetworkDriver.Join")
    assert r.status_code == 405 and "POST" in json.loads(r.data)["Err"]


# -- request size limit ------------------------------------------------------------


def test_body_over_one_mib_is_413_json_unread(client, caplog):
    big = json.dumps({"NetworkID": NID, "Options": {"x": "a" * (1024 * 1024)}})
    for path in ("/NetworkDriver.CreateNetwork", "/Plugin.Activate", "/nowhere"):
        r = client.post(path, data=big)
        assert r.status_code == 413
        body = json.loads(r.data)
        assert "1 MiB" in body["Err"] and body["Error"] == body["Err"]
    assert client.backend.calls == []
    assert "Traceback" not in caplog.text
    refusals = [rec for rec in caplog.records if "refused" in rec.getMessage()]
    assert refusals and all(rec.levelname == "WARNING" and not rec.exc_info
                            for rec in refusals)


def test_chunked_body_over_one_mib_is_413_json(client, caplog):
    import io
    raw = b'{"NetworkID": "' + b"n" * 64 + b'", "x": "' + b"a" * (2 << 20) + b'"}'
    # no Content-Length: the stream itself is capped
    r = client.post("/NetworkDriver.CreateNetwork", input_stream=io.BytesIO(raw),
                    headers={"Transfer-Encoding": "chunked"},
                    environ_overrides={"wsgi.input_terminated": True})
    assert r.status_code == 413
    assert "limit" in json.loads(r.data)["Err"]
    assert client.backend.calls == []
    assert "Traceback" not in caplog.text


def test_body_just_under_the_limit_is_read(client):
    body = json.dumps({"NetworkID": NID, "Options": {"x": "a" * 1000}})
    status, _ = post(client, "/NetworkDriver.CreateNetwork", raw=body)
    assert status in (200, 500)
