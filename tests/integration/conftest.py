"""Fixtures for integration tests: a session-wide lab (see tests/lab.py).

* ``lab``     - session-scoped ``Lab`` (switch netns; hosts added on demand).
* ``etcd_url``- session-scoped: etcd started in the lab's store netns.
* ``host_a``  - module-scoped host with a running dockerd (removed after the module).
* ``host_b``  - module-scoped second host with a running dockerd.
* ``make_host`` - module-scoped factory: ``make_host("c", dockerd=True)``;
  every host it made is removed after the module.

Everything here is skipped (with the reason) when the machine cannot run the
lab: not root, or dockerd/docker/etcd/nsenter/... missing.
"""
import os
import subprocess

import pytest

from tests.lab import Lab, missing_prerequisites

_HERE = os.path.dirname(os.path.abspath(__file__))
_MISSING = missing_prerequisites()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not str(item.fspath).startswith(_HERE + os.sep):
            continue
        item.add_marker(pytest.mark.integration)
        if _MISSING:
            item.add_marker(pytest.mark.skip(reason="lab unavailable: " + "; ".join(_MISSING)))


def root_links():
    """Interface names of the machine's own network namespace."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip())


@pytest.fixture(scope="session")
def lab():
    if _MISSING:
        pytest.skip("lab unavailable: " + "; ".join(_MISSING))
    before = root_links()
    lab = Lab.create()
    lab.root_links_before = before
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def etcd_url(lab):
    return lab.start_etcd()


@pytest.fixture(scope="module")
def make_host(lab):
    made = []

    def make(name, dockerd=True, dockerd_args=()):
        host = lab.add_host(name)
        made.append(host)
        if dockerd:
            host.start_dockerd(dockerd_args)
        return host

    yield make
    for host in reversed(made):
        lab.remove_host(host)


@pytest.fixture(scope="module")
def host_a(make_host):
    return make_host("a")


@pytest.fixture(scope="module")
def host_b(make_host):
    return make_host("b")
