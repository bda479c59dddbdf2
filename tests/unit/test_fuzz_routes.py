"""Property-based fuzz of every route of the Flask app (hypothesis), with the
real Calico backend on the embedded datastore (netlink replaced by a
recorder, as in test_calico_backend): random and adversarial JSON bodies.

Every answer is JSON; anything but HTTP 200 carries ``Err``; nothing logs a
traceback (a crash); and a refused call leaves the datastore byte-identical.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from backends.calico import driver, model as keys  # noqa: E402
from netplugin.app import create_app  # noqa: E402
from tests.netns_runner import calico_backend  # noqa: E402

NID = "3df319d886f3a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f607182930"
EID = "27d4e97367f0aabbccddeeff00112233445566778899aabbccddeeff00112233"
POOL = "10.10.0.0/24"


class FakeLinux:
    """Records netlink/sysctl calls (in-process tests must not touch the
    machine's network namespace)."""

    def __getattr__(self, name):
        return lambda *a, **kw: {"delete_link": False, "ipv6_available": True}.get(name)


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.crashes = []

    def emit(self, record):
        if record.exc_info or "crashed" in record.getMessage() \
                or "Traceback" in record.getMessage():
            self.crashes.append(self.format(record))


@pytest.fixture(scope="module")
def world():
    mp = pytest.MonkeyPatch()
    mp.setattr(driver, "linux", FakeLinux())
    tmp = tempfile.mkdtemp(prefix="netplugin-fuzz-")
    backend, store = calico_backend(os.path.join(tmp, "state.db"))
    store.inner.put(keys.pool(POOL), json.dumps({"cidr": POOL}))
    app = create_app(backend, "local")
    client = app.test_client()
    # a network and an endpoint the fuzzer's IDs may hit
    client.post("/NetworkDriver.CreateNetwork", data=json.dumps({
        "NetworkID": NID, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "10.20.0.0/24",
                      "Gateway": "10.20.0.1/24"}]}))
    client.post("/NetworkDriver.CreateEndpoint", data=json.dumps({
        "NetworkID": NID, "EndpointID": EID, "Interface": {"Address": "10.20.0.5/24"}}))
    recorder = Recorder()
    root = logging.getLogger()
    root.addHandler(recorder)
    paths = sorted(r.rule for r in app.url_map.iter_rules() if r.endpoint != "static")
    yield client, store, recorder, paths
    root.removeHandler(recorder)
    store.close()
    mp.undo()


def snapshot(store):
    return [(i.key, i.value) for i in store.inner.list_prefix("/")]


ids = st.sampled_from([NID, EID, "a" * 64, "x", "", "../../etc", "a" * 65, "A-b.c_d",
                       "\u00e9", "0" * 200, "n\x00", " "])
addresses = st.sampled_from(["10.20.0.6/24", "10.20.0.5/24", "10.99.0.2/32", "0.0.0.0/0",
                             "10.10.0.3/32", "10.10.0.3", "::/0", "fd00::1/64", "300.1.1.1/8",
                             "10.20.0.0/1", "", "garbage", "10.10.0.0/24"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True), st.text(max_size=40), ids, addresses)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12)
FIELDS = ["NetworkID", "EndpointID", "PoolID", "Pool", "SubPool", "Address", "AddressSpace",
          "Options", "IPv4Data", "IPv6Data", "Interface", "SandboxKey", "V6", "Gateway",
          "DiscoveryType", "DiscoveryData", "AuxAddresses", "MacAddress", "AddressIPv6"]
field_values = st.one_of(json_values, ids, addresses,
                         st.sampled_from(["CalicoPoolIPv4", "CalicoPoolIPv6", POOL,
                                          "swarm:abc:" + POOL, "swarm::", "10.20.0.0/24"]),
                         st.fixed_dictionaries({}, optional={
                             "Address": addresses, "AddressIPv6": addresses,
                             "MacAddress": st.sampled_from(["ee:ee:ee:ee:ee:ee", "zz", ""]),
                             "com.docker.network.generic": json_values,
                             "com.docker.network.endpoint.macaddress":
                                 st.sampled_from(["7u7u7u7u", "AkIKFAAF", "02:42:0a:14:00:05"]),
                             "RequestAddressType": st.just("com.docker.network.gateway")}),
                         st.lists(st.fixed_dictionaries(
                             {"Pool": addresses}, optional={"Gateway": addresses,
                                                            "AddressSpace": st.text(max_size=8),
                                                            "AuxAddresses": json_values}),
                             max_size=2))
shaped = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=6)
hexids = st.one_of(st.sampled_from([NID, EID]),
                   st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
pool_ids = st.sampled_from(["CalicoPoolIPv4", "CalicoPoolIPv6", POOL, "10.10.0.0/25",
                            "swarm:abc:" + POOL, "swarm:abc:CalicoPoolIPv4", "10.20.0.0/24"])
ips = st.sampled_from(["10.10.0.3", "10.10.0.200", "10.20.0.5", "10.99.0.2", "0.0.0.0",
                       "::", "fd00::1", "10.10.1.1"])
# nearly valid bodies: Docker's shapes with adversarial values
endpoint_body = st.fixed_dictionaries({"NetworkID": hexids, "EndpointID": hexids})
create_endpoint = st.fixed_dictionaries({
    "NetworkID": hexids, "EndpointID": hexids,
    "Interface": st.fixed_dictionaries({"Address": addresses})})
join = st.fixed_dictionaries({"NetworkID": hexids, "EndpointID": hexids,
                              "SandboxKey": st.just("/var/run/docker/netns/0123"),
                              "Options": st.just({})})
create_network = st.fixed_dictionaries({"NetworkID": hexids, "Options": st.fixed_dictionaries(
        {"com.docker.network.generic": st.dictionaries(
            st.sampled_from(["profile", "ipip", "nat-outgoing", "x"]),
            st.sampled_from(["", "team-web", "true", "../x", "a" * 300]), max_size=2)}),
        "IPv4Data": st.lists(st.fixed_dictionaries({"Pool": addresses, "Gateway": addresses}),
                             max_size=2)})
request_address = st.fixed_dictionaries({
    "PoolID": pool_ids, "Address": st.one_of(st.just(""), ips), "Options": st.one_of(
        st.none(), st.just({"RequestAddressType": "com.docker.network.gateway"}),
        st.just({"com.docker.network.endpoint.macaddress": "02:42:0a:0a:00:03"}))})
release_address = st.fixed_dictionaries({"PoolID": pool_ids, "Address": ips})
request_pool = st.fixed_dictionaries({
    "Pool": st.sampled_from(["", POOL, "10.10.0.0/25", "10.99.0.0/16", "0.0.0.0/0"]),
    "AddressSpace": st.sampled_from(["CalicoLocalAddressSpace", "CalicoGlobalAddressSpace",
                                     "x"]),
    "Options": st.just({}), "V6": st.booleans()})
COHERENT = {
    "/NetworkDriver.CreateNetwork": create_network,
    "/NetworkDriver.DeleteNetwork": st.fixed_dictionaries({"NetworkID": hexids}),
    "/NetworkDriver.CreateEndpoint": create_endpoint,
    "/NetworkDriver.DeleteEndpoint": endpoint_body,
    "/NetworkDriver.Leave": endpoint_body,
    "/NetworkDriver.EndpointOperInfo": endpoint_body,
    "/NetworkDriver.Join": join,
    "/IpamDriver.RequestPool": request_pool,
    "/IpamDriver.ReleasePool": st.fixed_dictionaries({"PoolID": pool_ids}),
    "/IpamDriver.RequestAddress": request_address,
    "/IpamDriver.ReleaseAddress": release_address,
}
coherent = st.one_of(*COHERENT.values())
bodies = st.one_of(
    coherent.map(json.dumps),
    shaped.map(json.dumps),
    json_values.map(json.dumps),
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"[" * 5000 + b"]" * 5000, b'{"NetworkID": ' * 300,
                     b"\xff\xfe{", b"null", b"1e999", b'"' + b"\\u0000" * 10 + b'"']),
)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_every_route_answers_json_and_refusals_change_nothing(world, data):
    client, store, recorder, paths = world
    path = data.draw(st.sampled_from(paths), label="path")
    if path in COHERENT and data.draw(st.booleans(), label="coherent"):
        body = json.dumps(data.draw(COHERENT[path], label="body"))
    else:
        body = data.draw(bodies, label="body")
    before = snapshot(store)
    r = client.post(path, data=body)
    answer = json.loads(r.data) if r.mimetype != "text/plain" else None
    if path == "/metrics":            # the operator's text format (GET); POST is 405
        assert r.status_code == 405
        answer = json.loads(r.data)
    assert isinstance(answer, dict), (path, body, r.data[:200])
    if r.status_code != 200:
        assert isinstance(answer.get("Err"), str) and answer["Err"], (path, body, answer)
        assert snapshot(store) == before, (path, body, answer)
    hypothesis.event(f"{path} {r.status_code}")
    assert r.status_code in (200, 404, 405, 413, 500)
    assert not recorder.crashes, recorder.crashes
