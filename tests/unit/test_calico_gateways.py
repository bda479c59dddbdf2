"""Per-container gateway choice (one link-local next hop per Calico interface)
and the per-network MTU option."""
import json
import os

import pytest

from backends.calico.driver import network_mtu, parse_network_options
from backends.calico.gateways import GatewayTable
from netplugin.errors import InvalidRequest


def test_first_interface_gets_169_254_1_1_next_ones_the_next_free(tmp_path):
    table = GatewayTable(str(tmp_path))
    alive = lambda eid: True  # noqa: E731
    assert table.choose("/netns/c1", "e1", alive) == "169.254.1.1"
    assert table.choose("/netns/c1", "e2", alive) == "169.254.1.2"
    assert table.choose("/netns/c1", "e1", alive) == "169.254.1.1"   # repeated Join
    assert table.choose("/netns/c2", "e3", alive) == "169.254.1.1"   # another container
    table.release("e1")
    assert table.choose("/netns/c1", "e4", alive) == "169.254.1.1"   # freed, reused
    for eid in ("e2", "e3", "e4"):
        table.release(eid)
    assert os.listdir(tmp_path / "sandboxes") == []                  # nothing left
    table.release("never-joined")                                     # idempotent


def test_entries_of_dead_endpoints_are_forgotten(tmp_path):
    table = GatewayTable(str(tmp_path))
    assert table.choose("/netns/c1", "gone", lambda e: True) == "169.254.1.1"
    # "gone" crashed without Leave: its veth no longer exists.
    assert table.choose("/netns/c1", "new", lambda e: e != "gone") == "169.254.1.1"


def test_mtu_option():
    assert parse_network_options({"mtu": "1400"})["mtu"] == 1400
    assert parse_network_options({"com.docker.network.driver.mtu": "9000"})["mtu"] == 9000
    assert parse_network_options({})["mtu"] is None
    for bad in ("big", "20", "70000", ""):
        with pytest.raises(InvalidRequest) as exc:
            parse_network_options({"mtu": bad})
        assert "'mtu'" in str(exc.value) and "68 and 65535" in str(exc.value)
    record = {"Options": {"com.docker.network.generic": {"mtu": "1280"}}}
    assert network_mtu(record) == 1280
    assert network_mtu({"Options": None}) is None


def test_endpoint_carries_network_mtu_and_join_reads_once(tmp_path):
    from tests.netns_runner import calico_backend
    from tests.unit.test_calico_backend import create_ep, create_net

    backend, store = calico_backend(str(tmp_path / "state.db"))
    backend.create_network(create_net(generic={"mtu": "1280"}))
    store.reset()
    backend.create_endpoint(create_ep())
    # 2R: network record, profile; the first endpoint stores the profile too
    assert store.counts == {"R": 2, "W": 5, "D": 0}
    (item,) = store.inner.list_prefix("/calico/v1/host/")
    assert json.loads(item.value)["mtu"] == 1280
