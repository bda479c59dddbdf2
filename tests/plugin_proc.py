"""Run the real plugin (./plugin) inside a lab host and talk to its socket."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from netplugin import unixhttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "plugin")


def call(sock_path: str, path: str, body: Any = None, raw: Optional[bytes] = None,
         timeout: float = 30) -> Tuple[int, Dict[str, Any]]:
    """POST like dockerd does (no Content-Type); return (status, decoded JSON)."""
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    status, answer = unixhttp.post(sock_path, path, data, timeout)
    return status, json.loads(answer or b"{}")


class PluginProcess:
    """``./plugin -f CONFIG`` started inside ``host`` (its net + mount ns).

    ``socket_path`` is where the socket appears in the machine's file system
    (the host's /run/docker/plugins is a bind mount of ``host.plugins_dir``).
    """

    def __init__(self, host, config_text: str, name: str = "calico"):
        self.host = host
        self.name = name
        self.config_path = os.path.join(host.dir, f"{name}.cfg")
        self.log_path = os.path.join(host.dir, f"{name}.log")
        self.socket_path = os.path.join(host.plugins_dir, f"{name}.sock")
        if "[calico]" in config_text and "docker_endpoint" not in config_text:
            # the lab host's dockerd (its health check and the leak audit ask it)
            config_text = config_text.replace(
                "[calico]\n", f'[calico]\ndocker_endpoint = "unix://{host.sock}"\n', 1)
        with open(self.config_path, "w") as f:
            f.write(config_text)
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30, poll: float = 0.1) -> "PluginProcess":
        self.proc = self.host.spawn([LAUNCHER, "-f", self.config_path], self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"plugin exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = call(self.socket_path, "/Plugin.Activate", timeout=2)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(poll)
        raise RuntimeError(f"plugin did not answer on {self.socket_path}:\n{self.log()}")

    def call(self, path: str, body: Any = None, raw: Optional[bytes] = None):
        return call(self.socket_path, path, body, raw)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def costs(self, call_name: str):
        """(R, W, D) of every logged successful call: "Join" means
        NetworkDriver.Join; IPAM calls are named in full ("IpamDriver.RequestAddress")."""
        out = []
        if "." not in call_name:
            call_name = "NetworkDriver." + call_name
        pattern = re.compile(r"%s .*ok in .*\(datastore (\d+)R (\d+)W (\d+)D\)"
                             % re.escape(call_name))
        for line in self.log().splitlines():
            m = pattern.search(line)
            if m:
                out.append(tuple(int(x) for x in m.groups()))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


class LabStore(str):
    """The lab's etcd as the tests name it: the URL (a str, as before) plus
    the datastore ``kind`` ("etcd": v2 API, "etcdv3") and every endpoint
    (a cluster lists its members).  ``etcd_config``/``store`` follow it."""

    def __new__(cls, url: str, kind: str = "etcd", endpoints: Optional[List[str]] = None):
        self = super().__new__(cls, url)
        self.kind = kind
        self.endpoints = list(endpoints or [url])
        return self


def _kind_and_endpoints(url) -> Tuple[str, List[str]]:
    return getattr(url, "kind", "etcd"), list(getattr(url, "endpoints", None) or [str(url)])


def etcd_config(url: str, hostname: str, scope: str = "local", **calico: Any) -> str:
    """A Calico plugin config on the lab's etcd at ``url`` (a ``LabStore``
    says which API and endpoints); ``calico`` adds keys of the ``[calico]``
    table (strings quoted, numbers as they are)."""
    kind, endpoints = _kind_and_endpoints(url)
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in calico.items())
    return (f'scope = "{scope}"\nbackend = "calico"\n'
            'socket = "/run/docker/plugins/calico.sock"\nlog_level = "info"\n'
            f'[datastore]\ntype = "{kind}"\nendpoints = {json.dumps(endpoints)}\ntimeout = 3.0\n'
            f'[calico]\nhostname = "{hostname}"\n{extra}')


# --------------------------------------------------------------------------
# Reading the lab's etcd and Docker's view from the tests.  etcd lives in the
# lab: the machine's own namespace cannot reach it, so these run inside a host.

_STORE = ("import json, sys\n"
          "from netplugin.config import DatastoreConfig\n"
          "from netplugin.datastore import open_datastore\n"
          "kind, endpoints = json.loads(sys.argv[1])\n"
          "s = open_datastore(DatastoreConfig(type=kind, endpoints=endpoints))\n"
          "op = sys.argv[2]\n"
          "if op == 'list':\n"
          "    print(json.dumps({i.key: i.value for i in s.list_prefix(sys.argv[3])}))\n"
          "elif op == 'get':\n"
          "    print(s.get(sys.argv[3]).value)\n"
          "elif op == 'put':\n"
          "    s.put(sys.argv[3], sys.argv[4])\n"
          "elif op == 'delete':\n"
          "    s.delete(sys.argv[3])\n"
          "elif op == 'rmtree':\n"
          "    s.delete_prefix(sys.argv[3])\n"
          "elif op == 'compact':\n"
          "    print(s.compact())\n"
          "elif op == 'assign':\n"
          "    from backends.calico.ipam import CalicoIpam\n"
          "    print(CalicoIpam(s).auto_assign_one(4, sys.argv[3]))\n")


def store(host, url, *args):
    """A datastore operation (list/get/put/delete/rmtree/assign) from inside
    ``host`` on the etcd at ``url``; returns its stdout."""
    return host.run(sys.executable, "-c", _STORE, json.dumps(_kind_and_endpoints(url)),
                    *args).stdout


def etcd_items(host, url, prefix="/calico"):
    """Every key under ``prefix`` (key -> value), host publications
    (``/calico/v1/host/<h>/bird_ip``) left out: they outlive containers."""
    items = json.loads(store(host, url, "list", prefix))
    return {k: v for k, v in items.items() if not k.endswith(("/bird_ip", "/bird6_ip"))}


def container_ip(host, name, network):
    out = host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout
    return json.loads(out)[network]["IPAddress"]


def wait_until(fn, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    """Call ``fn`` until it returns something true; return that, or raise
    AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def parse_metrics(text: str) -> Dict[Tuple[str, tuple], float]:
    """Prometheus exposition text -> {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def metric(found, name: str, **labels) -> float:
    """One sample of ``parse_metrics``'s answer (0 when absent)."""
    return found.get((name, tuple(sorted(labels.items()))), 0.0)
