"""FakeVrs: a TEST STAND-IN for Nuage's VRS agent, which is not available here.

A real Nuage VRS (Virtualized Routing & Switching, Nuage's Open vSwitch with
its agent) watches its OVSDB's ``Nuage_Port_Table`` / ``Nuage_VM_Table``,
asks its controller (VSC, which asks VSD) to resolve each new vPort, and
writes the answer back into the port row: ``ip_addr``, ``subnet_mask``,
``gateway``, ``vrf_id``, ``evpn_id``.  Neither VRS nor VSD can be run in the
test lab, so this helper plays that part, and nothing else, against the real
``ovsdb-server`` of the lab (``tests/nuage/vrs_lab.py``), over its own
python-ovs IDL connection.

Rules (the conservative reading of libvrsdk's tests, see docs/nuage.md):

* a vPort ``N`` is resolvable when its ``Nuage_Port_Table`` row has a ``mac``
  and no address yet (``ip_addr`` empty or ``0.0.0.0``), a ``Nuage_VM_Table``
  row lists ``N`` in ``ports`` with ``event == 2`` (Started) and ``state == 1``
  (Running), and an OVS ``Port`` named ``N`` is on the row's bridge;
* the VSD subnet is looked up by the row's ``nuage_network`` (the ``-o subnet``
  name) among the subnets the test declared with ``add_subnet``; unknown names
  and names passed to ``never_resolve`` are never resolved (that is how tests
  provoke the plugin's resolution timeout);
* after ``delay`` seconds it writes, in one transaction, ``ip_addr`` =
  ``metadata["static-ip"]`` (else the next free address of the subnet),
  ``subnet_mask`` (dotted), ``gateway`` (declared, else the first host),
  and non-zero ``vrf_id`` / ``evpn_id`` per subnet;
* it never deletes anything: removal is the plugin's job, which the tests check.

Usage (a thread in the test process; the OVSDB unix socket is a plain file)::

    vrs = FakeVrs("unix:/run/.../ovs/db.sock")
    vrs.add_subnet("Subnet 2", "10.21.59.0/24", gateway="10.21.59.1")
    vrs.start()
    ...
    vrs.stop()
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Dict, List, Optional, Set, Tuple

import ovs.db.idl
import ovs.poller

from tests.nuage import ovsdb_util

log = logging.getLogger("fake_vrs")

PORT_TABLE = "Nuage_Port_Table"
VM_TABLE = "Nuage_VM_Table"
EVENT_STARTED = 2
STATE_RUNNING = 1
UNRESOLVED = ("", "0.0.0.0")


class _Subnet:
    def __init__(self, name: str, cidr: str, gateway: Optional[str], index: int):
        self.name = name
        self.net = ipaddress.ip_network(cidr, strict=False)
        self.gateway = gateway or str(next(self.net.hosts()))
        self.vrf_id = 40000 + index
        self.evpn_id = 60000 + index


class FakeVrs:
    """Fills in what VSD would resolve for vPorts (see the module docstring)."""

    def __init__(self, remote: str, bridge: str = "alubr0", delay: float = 0.0):
        self.remote = remote
        self.bridge = bridge
        self.delay = delay
        self._subnets: Dict[str, _Subnet] = {}
        self._never: Set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._first_seen: Dict[str, float] = {}
        self._pending: List[Tuple[object, Dict[str, str]]] = []
        self.resolved: List[Tuple[str, str]] = []     # (vPort, ip) in resolution order
        self.connections = 0
        self.error: Optional[BaseException] = None

    # ---- configuration ----------------------------------------------------
    def add_subnet(self, name: str, cidr: str, gateway: Optional[str] = None) -> None:
        """Declare a VSD subnet called ``name`` (the ``-o subnet=`` value)."""
        with self._lock:
            self._subnets[name] = _Subnet(name, cidr, gateway, len(self._subnets) + 1)

    def never_resolve(self, name: str) -> None:
        """vPorts of VSD subnet ``name`` stay unresolved (provokes a timeout)."""
        with self._lock:
            self._never.add(name)

    # ---- lifecycle ------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "FakeVrs":
        schema = ovsdb_util._request(self.remote, "get_schema", ["Open_vSwitch"], timeout)
        helper = ovs.db.idl.SchemaHelper(schema_json=schema)
        helper.register_columns("Bridge", ["name", "ports"])
        helper.register_columns("Port", ["name"])
        helper.register_table(PORT_TABLE)
        helper.register_table(VM_TABLE)
        self._idl = ovs.db.idl.Idl(self.remote, helper)
        self._idl._session.reconnect.set_backoff(200, 1000)
        self._thread = threading.Thread(target=self._loop, name="fake-vrs", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while self.connections == 0:
            if self.error is not None:
                raise self.error
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake VRS could not load {self.remote} in {timeout}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        idl = getattr(self, "_idl", None)
        if idl is not None:
            idl.close()

    # ---- the loop ---------------------------------------------------------------
    def _loop(self) -> None:
        idl = self._idl
        seqno = None
        txn = None
        while not self._stop.is_set():
            try:
                idl.run()
                session = idl._session
                if session.is_connected() and idl.state == idl.IDL_S_MONITORING:
                    if session.get_seqno() != seqno:
                        seqno = session.get_seqno()
                        self.connections += 1
                if txn is not None:
                    status = txn.commit()
                    if status != ovs.db.idl.Transaction.INCOMPLETE:
                        if status not in (ovs.db.idl.Transaction.SUCCESS,
                                          ovs.db.idl.Transaction.UNCHANGED):
                            log.warning("fake VRS: resolve transaction: %s", txn.get_error())
                        txn = None
                wake_in = 1.0
                if txn is None and self.connections and idl.state == idl.IDL_S_MONITORING:
                    txn, wake_in = self._resolve_due(idl)
                poller = ovs.poller.Poller()
                idl.wait(poller)
                poller.timer_wait(max(1, int(min(wake_in, 0.2 if txn else 1.0) * 1000)))
                poller.block()
            except BaseException as exc:  # noqa: BLE001 - report to the test
                self.error = exc
                log.exception("fake VRS loop failed")
                self._stop.wait(0.2)

    def _resolvable(self, idl) -> List[object]:
        t = idl.tables
        on_bridge = set()
        for br in t["Bridge"].rows.values():
            for port in br.ports:
                on_bridge.add((br.name, port.name))
        started = set()
        for vm in t[VM_TABLE].rows.values():
            if vm.event == EVENT_STARTED and vm.state == STATE_RUNNING:
                started.update(vm.ports)
        out = []
        for row in t[PORT_TABLE].rows.values():
            if (row.mac and row.ip_addr in UNRESOLVED and row.name in started
                    and (row.bridge or self.bridge, row.name) in on_bridge):
                out.append(row)
        return out

    def _resolve_due(self, idl):
        """Start one transaction resolving every due vPort; (txn or None, seconds
        until the next one is due)."""
        now = time.monotonic()
        rows = self._resolvable(idl)
        names = {r.name for r in rows}
        for name in list(self._first_seen):
            if name not in names:
                del self._first_seen[name]
        due, wake_in = [], 1.0
        with self._lock:
            subnets = dict(self._subnets)
            never = set(self._never)
        for row in rows:
            first = self._first_seen.setdefault(row.name, now)
            left = first + self.delay - now
            if left > 0:
                wake_in = min(wake_in, left)
                continue
            sub = subnets.get(row.nuage_network)
            if sub is None or row.nuage_network in never:
                continue
            due.append((row, sub))
        if not due:
            return None, wake_in
        used = {r.ip_addr for r in idl.tables[PORT_TABLE].rows.values()}
        txn = ovs.db.idl.Transaction(idl)
        done = []
        for row, sub in due:
            ip = row.metadata.get("static-ip", "")
            try:
                if ipaddress.ip_address(ip) not in sub.net:
                    ip = ""
            except ValueError:
                ip = ""
            if not ip:
                ip = next((str(h) for h in sub.net.hosts()
                           if str(h) not in used and str(h) != sub.gateway), "")
            if not ip:
                continue
            used.add(ip)
            row.ip_addr = ip
            row.subnet_mask = str(sub.net.netmask)
            row.gateway = sub.gateway
            row.vrf_id = sub.vrf_id
            row.evpn_id = sub.evpn_id
            done.append((row.name, ip))
        status = txn.commit()
        if status in (ovs.db.idl.Transaction.SUCCESS, ovs.db.idl.Transaction.INCOMPLETE,
                      ovs.db.idl.Transaction.UNCHANGED):
            self.resolved.extend(done)
            for name, ip in done:
                log.info("fake VRS: resolved vPort %s -> %s", name, ip)
        return (txn if status == ovs.db.idl.Transaction.INCOMPLETE else None), 0.05
