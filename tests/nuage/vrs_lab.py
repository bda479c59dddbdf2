"""A VRS-like Open vSwitch inside a lab host, for the Nuage tests.

``LabVrs(host)`` runs, inside ``host``'s network and mount namespaces (via
``host.spawn``), a real ``ovsdb-server`` on a private database created from
the stock Open_vSwitch schema merged with the Nuage tables
(``tests/nuage/schema.py``), and a real ``ovs-vswitchd`` with a bridge
``alubr0`` of ``datapath_type=netdev`` (no kernel module needed).  Every file
lives in ``<host.dir>/ovs``; nothing touches the machine's own OVS.

The Nuage VRS agent itself is not available: ``tests/fake_vrs.py`` plays its
part.  ``ovs-vsctl`` is used here, in TEST SETUP only, to create the bridge;
the plugin never shells out.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from typing import Optional

from tests.nuage import ovsdb_util
from tests.nuage.schema import write_merged

OVSDB_SERVER = shutil.which("ovsdb-server", path="/usr/sbin:/usr/bin:/sbin:/bin") \
    or "/usr/sbin/ovsdb-server"
OVS_VSWITCHD = shutil.which("ovs-vswitchd", path="/usr/sbin:/usr/bin:/sbin:/bin") \
    or "/usr/sbin/ovs-vswitchd"
OVSDB_TOOL = shutil.which("ovsdb-tool", path="/usr/bin:/usr/sbin:/bin") or "/usr/bin/ovsdb-tool"
OVS_VSCTL = shutil.which("ovs-vsctl", path="/usr/bin:/usr/sbin:/bin") or "/usr/bin/ovs-vsctl"

BRIDGE = "alubr0"


def missing_ovs() -> list:
    return [p for p in (OVSDB_SERVER, OVS_VSWITCHD, OVSDB_TOOL, OVS_VSCTL)
            if not os.access(p, os.X_OK)]


class LabVrs:
    """ovsdb-server + ovs-vswitchd (+ bridge alubr0) inside one lab host."""

    def __init__(self, host, tcp_port: Optional[int] = None, bridge: str = BRIDGE):
        self.host = host
        self.bridge = bridge
        self.tcp_port = tcp_port
        self.dir = os.path.join(host.dir, "ovs")
        self.db_path = os.path.join(self.dir, "conf.db")
        self.schema_path = os.path.join(self.dir, "vswitch-nuage.ovsschema")
        self.sock = os.path.join(self.dir, "db.sock")
        self.remote = "unix:" + self.sock
        self.ovsdb = None
        self.vswitchd = None

    # -- helpers ----------------------------------------------------------
    @property
    def env(self):
        return {"OVS_RUNDIR": self.dir, "OVS_LOGDIR": self.dir, "OVS_DBDIR": self.dir}

    def vsctl(self, *args, timeout: int = 20, check: bool = True):
        """ovs-vsctl against this DB (test setup/debugging only)."""
        return self.host.run(OVS_VSCTL, f"--db={self.remote}", f"--timeout={timeout}",
                             *args, env=self.env, check=check, timeout=timeout + 10)

    def _wait(self, what, fn, timeout: float, proc=None):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if fn():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what}: process exited ({proc.returncode}); log:\n"
                                   + _tail(proc.log_path))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout}s"
                                   + ("; log:\n" + _tail(proc.log_path) if proc else ""))
            time.sleep(0.05)

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> "LabVrs":
        os.makedirs(self.dir, exist_ok=True)
        write_merged(self.schema_path)
        if not os.path.exists(self.db_path):
            self.host.run(OVSDB_TOOL, "create", self.db_path, self.schema_path)
        self.start_ovsdb()
        self.vsctl("--no-wait", "init")
        self.vsctl("--no-wait", "--may-exist", "add-br", self.bridge, "--", "set", "bridge",
                   self.bridge, "datapath_type=netdev")
        self.start_vswitchd()
        return self

    def start_ovsdb(self, timeout: float = 20) -> None:
        try:
            os.unlink(self.sock)
        except FileNotFoundError:
            pass
        remotes = [f"--remote=punix:{self.sock}"]
        if self.tcp_port:
            remotes.append(f"--remote=ptcp:{self.tcp_port}:127.0.0.1")
        self.ovsdb = self.host.spawn(
            [OVSDB_SERVER, self.db_path, *remotes,
             f"--pidfile={self.dir}/ovsdb-server.pid",
             f"--unixctl={self.dir}/ovsdb-server.ctl",
             f"--log-file={self.dir}/ovsdb-server.log"],
            log_path=os.path.join(self.dir, "ovsdb-server.out"), env=self.env)
        self._wait("ovsdb-server", lambda: "Nuage_Port_Table" in
                   ovsdb_util.list_tables(self.remote, timeout=2), timeout, self.ovsdb)

    def stop_ovsdb(self) -> None:
        if self.ovsdb is not None:
            self.host.stop_process(self.ovsdb, signal.SIGTERM, 10)
            self.ovsdb = None

    def restart_ovsdb(self) -> None:
        self.stop_ovsdb()
        self.start_ovsdb()

    def start_vswitchd(self, timeout: float = 30) -> None:
        self.vswitchd = self.host.spawn(
            [OVS_VSWITCHD, self.remote,
             f"--pidfile={self.dir}/ovs-vswitchd.pid",
             f"--unixctl={self.dir}/ovs-vswitchd.ctl",
             f"--log-file={self.dir}/ovs-vswitchd.log"],
            log_path=os.path.join(self.dir, "ovs-vswitchd.out"), env=self.env)
        # vswitchd creates the bridge's internal (tap) device once it runs.
        self._wait("ovs-vswitchd", lambda: self.host.run(
            "ip", "link", "show", self.bridge, check=False).returncode == 0,
            timeout, self.vswitchd)
        self.host.run("ip", "link", "set", self.bridge, "up")

    def stop(self) -> None:
        """Stop vswitchd then ovsdb-server (files stay until the host goes)."""
        for attr in ("vswitchd", "ovsdb"):
            p = getattr(self, attr)
            if p is not None:
                self.host.stop_process(p, signal.SIGTERM, 10)
                setattr(self, attr, None)

    # -- inspection -----------------------------------------------------------
    def select(self, table, where=None, columns=None):
        return ovsdb_util.select(self.remote, table, where, columns)

    def port_names(self):
        return ovsdb_util.bridge_port_names(self.remote, self.bridge)

    def ofport(self, name) -> int:
        rows = self.select("Interface", [["name", "==", name]], ["ofport"])
        if not rows or isinstance(rows[0]["ofport"], list):
            return -1
        return rows[0]["ofport"]

    def log(self, which="ovs-vswitchd") -> str:
        return _tail(os.path.join(self.dir, f"{which}.log"), 80)


def _tail(path, n=40):
    try:
        with open(path, "rb") as f:
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
