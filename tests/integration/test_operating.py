"""Operating the plugin in the lab (real dockerd, etcd, two gunicorn workers
and the host agent): /metrics after a run of containers, /health following
etcd, the log level of every process changed at runtime (netpluginctl and
SIGHUP), systemd readiness, and a boot with etcd down."""
import json
import os
import re
import signal
import socket
import time

import pytest
from netplugin import unixhttp
from tests.plugin_proc import (ROOT, PluginProcess, etcd_config, metric, parse_metrics,
                               wait_until)

pytestmark = pytest.mark.integration


def scrape(proc):
    status, body = unixhttp.get(proc.socket_path, "/metrics", 10)
    assert status == 200
    return parse_metrics(body.decode())


def health(proc):
    status, body = unixhttp.get(proc.socket_path, "/health", 15)
    return status, json.loads(body)


@pytest.fixture(scope="module")
def plugin(host_a, etcd_url):
    text = etcd_config(etcd_url, host_a.name).replace('log_level = "info"\n',
                                                        'log_level = "info"\nworkers = 2\n')
    proc = PluginProcess(host_a, text)
    proc.start()
    yield proc
    proc.stop()


def test_metrics_after_a_run_of_containers(host_a, plugin):
    before = scrape(plugin)
    host_a.docker("network", "create", "--driver=calico", "--subnet=10.88.0.0/24", "opsnet")
    try:
        for i in range(4):
            host_a.docker("run", "-d", "--net", "opsnet", "--name", f"ops{i}", "busybox",
                          "sleep", "1d")
        found = wait_until(lambda: (lambda f: f if metric(
            f, "netplugin_agent_sync_lag_seconds_count", agent="policy") > metric(
            before, "netplugin_agent_sync_lag_seconds_count", agent="policy") else None)(
            scrape(plugin)), what="a policy sync after the containers")
        for call in ("NetworkDriver.CreateEndpoint", "NetworkDriver.Join"):
            count = metric(found, "netplugin_call_duration_seconds_count", call=call) - \
                metric(before, "netplugin_call_duration_seconds_count", call=call)
            assert count == 4, (call, count)      # both workers' calls, summed once
        assert metric(found, "netplugin_call_duration_seconds_count",
                      call="NetworkDriver.CreateNetwork") >= 1
        assert metric(found, "netplugin_endpoints", host=host_a.name) == 4
        assert metric(found, "netplugin_networks") >= 1
        writes = sum(v for (name, labels), v in found.items()
                     if name == "netplugin_datastore_operations_total"
                     and ("kind", "write") in labels and ("result", "ok") in labels)
        assert writes >= 5
        # An error is counted by call and kind, and its Err names the request.
        status, answer = plugin.call("/NetworkDriver.Join", {"NetworkID": "x" * 64,
                                                              "EndpointID": "y" * 64,
                                                              "SandboxKey": "/nope"})
        assert status == 500 and "(request " in answer["Err"]
        rid = answer["Err"].rsplit("(request ", 1)[1].rstrip(")")
        assert f"[{rid}]" in plugin.log()
        after = scrape(plugin)
        assert sum(v for (name, labels), v in after.items()
                   if name == "netplugin_call_errors_total"
                   and ("call", "NetworkDriver.Join") in labels) >= 1
    finally:
        host_a.docker("rm", "-f", *[f"ops{i}" for i in range(4)], check=False)
        host_a.docker("network", "rm", "opsnet", check=False)


def test_log_level_of_every_process_at_runtime(host_a, plugin):
    def processes_at(level):
        pids = set(re.findall(r"^\S+ \S+ (\d+) WARNING netplugin.runstate: log level is now "
                              + level + "$", plugin.log(), re.M))
        return pids if len(pids) >= 4 else None       # master, 2 workers, agent

    started = time.monotonic()
    host_a.run(os.path.join(ROOT, "netpluginctl"), "-f", plugin.config_path, "log-level",
               "debug")
    wait_until(lambda: processes_at("debug"), timeout=5, what="every process at debug")
    assert time.monotonic() - started < 3
    with open(plugin.config_path) as f:
        text = f.read()
    with open(plugin.config_path, "w") as f:
        f.write(text.replace('log_level = "info"', 'log_level = "warning"'))
    try:
        plugin.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: processes_at("warning"), timeout=5, what="every process at warning")
        assert plugin.proc.poll() is None
        status, _ = plugin.call("/Plugin.Activate")
        assert status == 200
    finally:
        with open(plugin.config_path, "w") as f:
            f.write(text)


def test_health_follows_etcd(lab, host_a, plugin):
    status, body = wait_until(lambda: (lambda h: h if h[0] == 200 else None)(health(plugin)),
                         what="healthy")
    assert body["healthy"] and body["checks"]["docker"]["ok"]
    lab.stop_etcd()
    try:
        status, body = wait_until(lambda: (lambda h: h if h[0] == 503 else None)(health(plugin)),
                             what="unhealthy with etcd down")
        assert not body["checks"]["datastore"]["ok"]
        out = host_a.run(os.path.join(ROOT, "netpluginctl"), "-f", plugin.config_path,
                         "status", check=False)
        assert out.returncode == 1 and "UNHEALTHY" in out.stdout
    finally:
        lab.start_etcd()
    wait_until(lambda: health(plugin)[0] == 200, timeout=60, what="healthy again")


def test_ready_notification_once_the_socket_answers(host_a, etcd_url, tmp_path):
    notify_path = os.path.join(host_a.dir, "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(30)
    text = etcd_config(etcd_url, host_a.name).replace(
        "/run/docker/plugins/calico.sock", "/run/docker/plugins/boot.sock")
    proc = PluginProcess(host_a, text, name="boot")
    proc.proc = host_a.spawn([os.path.join(ROOT, "plugin"), "-f", proc.config_path],
                             proc.log_path, env={"NOTIFY_SOCKET": notify_path})
    try:
        message = listener.recv(4096).decode()
        assert "READY=1" in message
        status, _ = proc.call("/Plugin.Activate")      # it really answers by now
        assert status == 200
    finally:
        listener.close()
        proc.stop()


def test_boot_with_etcd_down(lab, host_a, plugin, etcd_url):
    """Plugin and dockerd start while etcd is down; a restart-always container
    ends with its network once etcd is back (dockerd does not retry a failed
    start: the agent starts it again, netplugin/restarter.py)."""
    host_a.docker("network", "create", "--driver=calico", "--subnet=10.89.0.0/24", "bootnet")
    try:
        host_a.docker("run", "-d", "--restart", "always", "--net", "bootnet", "--name",
                      "bootc", "busybox", "sleep", "1d")
        host_a.stop_dockerd()
        plugin.stop()
        lab.stop_etcd()
        try:
            plugin.start()                         # answers Activate without etcd
            status, body = health(plugin)
            assert status == 503 and not body["checks"]["datastore"]["ok"]
            host_a.start_dockerd()
            time.sleep(3)                          # dockerd tries and fails meanwhile
        finally:
            lab.start_etcd()
        ip = wait_until(lambda: json.loads(host_a.docker(
            "inspect", "-f", "{{json .NetworkSettings.Networks}}", "bootc").stdout
            or "{}").get("bootnet", {}).get("IPAddress") if host_a.docker(
            "inspect", "-f", "{{.State.Running}}", "bootc").stdout.strip() == "true" else None,
            timeout=90, interval=1, what="the container running with its network")
        assert ip.startswith("10.89.0.")
        routes = host_a.run("ip", "-4", "route").stdout
        assert ip in routes
    finally:
        host_a.docker("rm", "-f", "bootc", check=False)
        host_a.docker("network", "rm", "bootnet", check=False)
