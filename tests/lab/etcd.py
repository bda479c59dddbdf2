"""The lab's etcd (v2 API enabled) in its own *store* namespace on the switch, reachable
from every host: EtcdMixin gives Lab start_etcd / stop_etcd / store_run.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from .base import (CGROUP_NAME, ETCD, ETCD_PEER_PORT, ETCD_PORT, NSENTER, STORE_ADDR,
                   LabError, _run, _stop_popen, _tail)
from .netns import call_in_netns

def _http_get(host, port, path, timeout=5):
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (path, host)).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    return data.decode("utf-8", "replace")


class EtcdMixin:
    """Lab methods for the store namespace and its etcd."""

    def start_etcd(self, timeout=30):
        """Start etcd (v2 API on) in the store netns; return its URL for hosts."""
        if self._etcd is not None and self._etcd.poll() is None:
            return self.etcd_url
        if not os.path.exists(self.store_netns_path):
            self._netns_add(self.store_netns)
            self._attach(self.store_netns, 0, STORE_ADDR)
        edir = os.path.join(self.dir, "etcd")
        os.makedirs(edir, exist_ok=True)
        client = "http://%s:%d" % (STORE_ADDR, ETCD_PORT)
        peer = "http://127.0.0.1:%d" % ETCD_PEER_PORT
        argv = [NSENTER, "--net=" + self.store_netns_path, ETCD,
                "--name", "lab", "--data-dir", os.path.join(edir, "data"),
                "--listen-client-urls", "%s,http://127.0.0.1:%d" % (client, ETCD_PORT),
                "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "lab=" + peer, "--initial-cluster-state", "new",
                "--enable-v2=true"]
        log_path = os.path.join(edir, "etcd.log")
        self._etcd = self._spawn(argv, log_path, cgroup_rel=os.path.join(CGROUP_NAME, self.labid, "store"))
        self.etcd_url = client
        deadline = time.monotonic() + timeout
        while True:
            if self._etcd.poll() is not None:
                raise LabError("etcd exited (%s); log tail:\n%s" % (self._etcd.returncode, _tail(log_path)))
            try:
                body = call_in_netns(self.store_netns_path, _http_get, STORE_ADDR, ETCD_PORT, "/version", 2)
                if "etcdserver" in body:
                    return client
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LabError("etcd did not answer in %ss; log tail:\n%s" % (timeout, _tail(log_path)))
            time.sleep(0.2)

    def stop_etcd(self):
        """Stop etcd (data dir kept; start_etcd() starts it again)."""
        if self._etcd is not None and self._etcd.poll() is None:
            _stop_popen(self._etcd, signal.SIGTERM, 10)
        self._etcd = None

    def store_run(self, *cmd, check=True, timeout=60):
        """Run a command in the store (etcd) network namespace."""
        return _run([NSENTER, "--net=" + self.store_netns_path] + list(cmd), check=check, timeout=timeout)


class EtcdMember:
    """One member of a lab etcd cluster, running inside a lab host (its
    netns) on ``host.addr``: client URL ``url``, peer URL ``peer_url``."""

    def __init__(self, host, cluster):
        self.host = host
        self.name = "etcd-" + host.name
        self.url = "http://%s:%d" % (host.addr, ETCD_PORT)
        self.peer_url = "http://%s:%d" % (host.addr, ETCD_PEER_PORT)
        self.cluster = cluster
        self.dir = os.path.join(host.dir, "etcd")
        self.proc = None

    def start(self):
        """Start (or restart: the data dir is kept, the member rejoins)."""
        os.makedirs(self.dir, exist_ok=True)
        argv = [ETCD, "--name", self.name, "--data-dir", os.path.join(self.dir, "data"),
                "--listen-client-urls", "%s,http://127.0.0.1:%d" % (self.url, ETCD_PORT),
                "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.cluster.initial_cluster,
                "--initial-cluster-state", "new",
                "--heartbeat-interval", "100", "--election-timeout", "1000",
                "--log-level", "error"]
        self.proc = self.host.spawn(argv, log_path=os.path.join(self.dir, "etcd.log"))

    def answers(self):
        try:
            return "etcdserver" in self.host.call(_http_get, self.host.addr, ETCD_PORT,
                                                  "/version", 2)
        except OSError:
            return False

    def status(self):
        """maintenance/status of this member (dict) or None."""
        import json
        body = self.host.run("python3", "-c", _STATUS, "http://127.0.0.1:%d" % ETCD_PORT,
                             check=False, timeout=10).stdout
        try:
            return json.loads(body)
        except ValueError:
            return None

    def kill(self, sig=signal.SIGKILL):
        if self.proc is not None and self.proc.poll() is None:
            _stop_popen(self.proc, sig, 10)
        self.proc = None


_STATUS = ("import sys, urllib.request\n"
           "r = urllib.request.urlopen(urllib.request.Request(sys.argv[1] + '/v3/maintenance/status',"
           " data=b'{}'), timeout=3)\n"
           "print(r.read().decode())\n")


class EtcdCluster:
    """A 3-member etcd cluster, one member per lab host (``hosts``); the
    v3 API is served (and v2's is not: `etcdv3` only)."""

    def __init__(self, hosts):
        self.members = []
        for h in hosts:
            self.members.append(EtcdMember(h, self))
        self.initial_cluster = ",".join("%s=%s" % (m.name, m.peer_url) for m in self.members)
        self.urls = [m.url for m in self.members]

    def start(self, timeout=30):
        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                m.start()
        self.wait_leader(timeout)

    def leader(self):
        """The member that is leader now, or None."""
        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                continue
            st = m.status()
            if st and st.get("leader") and st["header"]["member_id"] == st["leader"]:
                return m
        return None

    def wait_leader(self, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader()
            if leader is not None:
                return leader
            if time.monotonic() > deadline:
                tails = "\n".join("%s:\n%s" % (m.name, _tail(os.path.join(m.dir, "etcd.log")))
                                  for m in self.members)
                raise LabError("etcd cluster has no leader after %ss:\n%s" % (timeout, tails))
            time.sleep(0.3)

    def stop(self):
        for m in self.members:
            m.kill(signal.SIGTERM)
