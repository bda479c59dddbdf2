"""Fixtures of the Nuage end-to-end tests (imported by test_nuage_e2e.py).

* ``nuage_host``   - a lab host ``nu`` with its own dockerd (module scope).
* ``lab_vrs``      - real ovsdb-server (stock schema + Nuage tables, unix socket
                     and ptcp:6633 on 127.0.0.1) and real ovs-vswitchd with the
                     netdev bridge alubr0, inside ``nuage_host``.
* ``fake_vrs``     - ``tests.fake_vrs.FakeVrs`` playing the VRS agent (a thread
                     of the test process on the OVSDB unix socket), with the
                     VSD subnets the tests use declared.
* ``nuage_plugin`` - ``./plugin`` with ``backend = "nuage"`` serving that
                     dockerd (socket nuage.sock), embedded datastore.
* ``nuage_config`` - the config text builder, for extra plugin instances.
"""
from __future__ import annotations

import os

import pytest

from tests.fake_vrs import FakeVrs
from tests.nuage.vrs_lab import LabVrs, missing_ovs
from tests.plugin_proc import PluginProcess

HOST = "nu"
VRS_TCP_PORT = 6633

#: (VSD subnet name, Docker --subnet, gateway) declared to the fake VRS.
SUBNETS = [
    ("Subnet 2", "10.21.59.0/24", "10.21.59.1"),
    ("Subnet 3", "10.21.60.0/24", "10.21.60.1"),
]
#: A VSD subnet the fake VRS never resolves (resolution-timeout tests).
SILENT_SUBNET = ("Silent", "10.21.61.0/24", "10.21.61.1")

CONFIG = """\
backend = "nuage"
scope = "local"
socket = "/run/docker/plugins/{name}.sock"
log_level = "info"
state_dir = "{state_dir}"

[datastore]
type = "embedded"
path = "{state}"

[nuage]
vrs_endpoint = "{vrs_endpoint}"
vrs_port = {vrs_port}
vrs_bridge = "alubr0"
docker_endpoint = "{docker}"
resolve_timeout = {resolve_timeout}
vrs_timeout = 3.0
docker_timeout = 3.0
hostname = "{hostname}"
"""


def nuage_config(host, vrs_endpoint, name="nuage", vrs_port=VRS_TCP_PORT,
                 resolve_timeout=4.0, state=None):
    return CONFIG.format(name=name, state=state or os.path.join(host.dir, f"{name}-state.db"),
                         vrs_endpoint=vrs_endpoint, vrs_port=vrs_port,
                         docker=host.docker_host, resolve_timeout=resolve_timeout,
                         hostname=host.name, state_dir=os.path.join(host.dir, "run"))


@pytest.fixture(scope="module")
def nuage_host(make_host):
    missing = missing_ovs()
    if missing:
        pytest.skip("Open vSwitch binaries missing: " + ", ".join(missing))
    return make_host(HOST)


@pytest.fixture(scope="module")
def lab_vrs(nuage_host):
    vrs = LabVrs(nuage_host, tcp_port=VRS_TCP_PORT)
    try:
        vrs.start()
        yield vrs
    finally:
        vrs.stop()


@pytest.fixture(scope="module")
def fake_vrs(lab_vrs):
    vrs = FakeVrs(lab_vrs.remote, bridge=lab_vrs.bridge)
    for name, cidr, gw in SUBNETS + [SILENT_SUBNET]:
        vrs.add_subnet(name, cidr, gw)
    vrs.never_resolve(SILENT_SUBNET[0])
    vrs.start()
    try:
        yield vrs
    finally:
        vrs.stop()


@pytest.fixture(scope="module")
def nuage_plugin(nuage_host, lab_vrs, fake_vrs):
    proc = PluginProcess(nuage_host, nuage_config(nuage_host, lab_vrs.remote), name="nuage")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
