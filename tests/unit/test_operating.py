"""What operators read: /metrics (parsed with prometheus_client's parser),
/health, the agent's status file, the runtime log level, request ids in Err."""
import json
import logging
import os
import threading
import time

import pytest

import backends.calico.driver  # noqa: F401  (registers "calico")
from backends.calico import model as keys
from backends.calico.driver import CalicoBackend
from netplugin import runstate
from netplugin.app import create_app, create_operator_app
from netplugin.config import config_from_text
from netplugin.datastore import CountingDatastore
from netplugin.datastore.embedded import EmbeddedDatastore
from tests.plugin_proc import metric as value
from tests.plugin_proc import parse_metrics as samples

POOL = "10.30.0.0/24"


@pytest.fixture
def backend(tmp_path):
    store = CountingDatastore(EmbeddedDatastore(str(tmp_path / "state.db")))
    cfg = config_from_text(f'backend = "calico"\nstate_dir = "{tmp_path}/run"\n'
                           f'[calico]\nhostname = "h1"\n'
                           f'docker_endpoint = "unix://{tmp_path}/no-docker.sock"\n')
    b = CalicoBackend(cfg, store)
    store.put(keys.pool(POOL), json.dumps({"cidr": POOL}))
    yield b
    store.close()


def test_metrics_count_calls_errors_datastore_and_pool_use(backend):
    client = create_app(backend, "local").test_client()
    before = samples(client.get("/metrics").data.decode())
    pool_id = json.loads(client.post("/IpamDriver.RequestPool", data=json.dumps(
        {"AddressSpace": "CalicoLocalAddressSpace", "Pool": "", "Options": {}, "V6": False})
    ).data)["PoolID"]
    for _ in range(3):
        assert client.post("/IpamDriver.RequestAddress", data=json.dumps(
            {"PoolID": pool_id, "Address": "", "Options": {}})).status_code == 200
    bad = client.post("/NetworkDriver.Join", data=b"{not json")
    assert bad.status_code == 500
    found = samples(client.get("/metrics").data.decode())

    def delta(name, **labels):
        return value(found, name, **labels) - value(before, name, **labels)

    assert delta("netplugin_call_duration_seconds_count", call="IpamDriver.RequestAddress") == 3
    assert delta("netplugin_call_errors_total", call="NetworkDriver.Join",
                 kind="InvalidRequest") == 1
    assert delta("netplugin_datastore_operations_total", kind="write",
                 op="compare_and_swap", result="ok") >= 3
    assert value(found, "netplugin_pool_addresses", pool=POOL, state="allocated") == 3
    assert value(found, "netplugin_pool_addresses", pool=POOL, state="free") == 256 - 3
    assert value(found, "netplugin_endpoints", host="h1") == 0
    assert value(found, "netplugin_networks") == 0


def test_err_carries_the_request_id_of_its_log_line(backend, caplog):
    client = create_app(backend, "local").test_client()
    with caplog.at_level(logging.INFO, logger="netplugin.app"):
        answer = json.loads(client.post("/NetworkDriver.Join", data=b"[1]").data)
    rid = answer["Err"].rsplit("(request ", 1)[1].rstrip(")")
    assert len(rid) == 8
    assert any(f"[{rid}]" in r.getMessage() for r in caplog.records)


def test_health_follows_datastore_agent_and_docker(backend, tmp_path):
    client = create_operator_app(backend).test_client()
    r = client.get("/health")
    body = json.loads(r.data)
    assert r.status_code == 503 and not body["healthy"]
    assert body["checks"]["datastore"]["ok"]
    assert not body["checks"]["agent"]["ok"]              # no agent has reported
    assert not body["checks"]["docker"]["ok"]             # no dockerd at that socket
    status = runstate.AgentStatus(backend.config.driver_state_dir)
    status.report("policy", True)
    status.write()
    assert json.loads(client.get("/health").data)["checks"]["agent"]["ok"]
    status.report("routes", False, "no route to 10.0.0.1")
    status.write()
    agent = json.loads(client.get("/health").data)["checks"]["agent"]
    assert not agent["ok"] and "no route to 10.0.0.1" in agent["detail"]


def test_log_level_file_reaches_a_process_within_a_second(tmp_path):
    root = logging.getLogger()
    old = root.level
    stop = threading.Event()
    try:
        root.setLevel(logging.INFO)
        runstate.watch_log_level(str(tmp_path), stop, interval=0.05)
        runstate.set_log_level(str(tmp_path), "debug")
        deadline = time.monotonic() + 1.0
        while root.level != logging.DEBUG and time.monotonic() < deadline:
            time.sleep(0.02)
        assert root.level == logging.DEBUG
        with pytest.raises(ValueError):
            runstate.set_log_level(str(tmp_path), "chatty")
        assert os.path.exists(runstate.level_path(str(tmp_path)))
    finally:
        stop.set()
        root.setLevel(old)


def test_progress_on_a_terminal_only():
    import io
    from netplugin.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        with Progress("pool remove 10.0.0.0/16", 3, "blocks", stream=stream, every=0) as p:
            for _ in range(3):
                p.step()
    assert "pool remove 10.0.0.0/16: 3/3 blocks" in tty.getvalue()
    assert tty.getvalue().endswith("\r")          # the line is wiped at the end
    assert pipe.getvalue() == ""                  # scripts see nothing
