"""Fixtures for integration tests: a session-wide lab (see tests/lab/).

* ``lab``     - session-scoped ``Lab`` (switch netns; hosts added on demand).
* ``etcd_url``- session-scoped: etcd started in the lab's store netns (a
  ``LabStore``: the URL, with the datastore kind the plugins use).  A module
  marked ``@pytest.mark.datastores("etcd", "etcdv3")`` runs on both APIs of
  that etcd (ids ``[etcd]``, ``[etcdv3]``); ``etcdv3`` on one Docker version
  only (26 when selected), which keeps CI's time in bounds.
* ``host_a``  - module-scoped host with a running dockerd (removed after the module).
* ``host_b``  - module-scoped second host with a running dockerd.
* ``managed_plugin_dir`` - session-scoped: build/managed-plugin/ built by
  scripts/managed-plugin.sh (config.json + rootfs).
* ``make_host`` - module-scoped factory: ``make_host("c", dockerd=True)``;
  every host it made is removed after the module.
* ``docker_version`` - module-scoped parameter: the Docker version ("20.10",
  "26", "28") the module's hosts run.  Every test that uses a host runs once per
  version in ``$NETPLUGIN_DOCKER_VERSIONS`` (comma-separated, default all), with
  ids ``[docker20.10]``, ``[docker26]``, ``[docker28]``.  A module or test marked
  ``@pytest.mark.docker_versions("20.10")`` runs only on those versions (e.g.
  what needs ``--cluster-store``, gone since Docker 23).  A version that cannot
  be fetched here skips its tests with the reason.

Everything here is skipped (with the reason) when the machine cannot run the
lab: not root, or dockerd/docker/etcd/nsenter/... missing.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.lab import Lab, missing_prerequisites
from tests.plugin_proc import ROOT, LabStore
from tests.lab.docker_versions import (VERSIONS_ENV, DockerUnavailable, docker_install,
                                       selected_versions)

_HERE = os.path.dirname(os.path.abspath(__file__))
_MISSING = missing_prerequisites()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "docker_versions(*versions): run only on these Docker versions of the lab")
    config.addinivalue_line(
        "markers", "datastores(*kinds): run on each datastore kind of the lab etcd "
                   "(etcd, etcdv3); etcdv3 on one Docker version")


def etcdv3_docker_version():
    """The one Docker version the etcdv3 runs of ``datastores`` modules use."""
    wanted = selected_versions()
    return "26" if "26" in wanted else wanted[0]


def pytest_generate_tests(metafunc):
    kinds = [k for mark in metafunc.definition.iter_markers("datastores") for k in mark.args]
    if kinds and "etcd_url" in metafunc.fixturenames:
        metafunc.parametrize("etcd_url", [pytest.param(k, id=k) for k in kinds],
                             indirect=True, scope="module")
    _parametrize_docker(metafunc)


def _parametrize_docker(metafunc):
    if "docker_version" not in metafunc.fixturenames:
        return
    wanted = selected_versions()
    allowed = None
    for mark in metafunc.definition.iter_markers("docker_versions"):
        names = {str(v) for v in mark.args}
        allowed = names if allowed is None else allowed & names
    versions = [v for v in wanted if allowed is None or v in allowed]
    if versions:
        params = [pytest.param(v, id="docker" + v) for v in versions]
    else:
        reason = "runs on Docker %s only; %s=%s" % (
            ", ".join(sorted(allowed)), VERSIONS_ENV, ",".join(wanted))
        params = [pytest.param(None, id="docker-none", marks=pytest.mark.skip(reason=reason))]
    metafunc.parametrize("docker_version", params, indirect=True, scope="module")


@pytest.fixture(scope="module")
def docker_version(request):
    version = getattr(request, "param", None) or selected_versions()[0]
    if not _MISSING:
        try:
            docker_install(version)        # fetched once per cache, then reused
        except DockerUnavailable as e:
            pytest.skip("Docker %s unavailable: %s" % (version, e))
    return version


def pytest_collection_modifyitems(config, items):
    v3_docker = etcdv3_docker_version()
    keep, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("etcd_url") == "etcdv3" and params.get("docker_version") not in (
                None, v3_docker):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
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
def etcd_url(lab, request):
    kind = getattr(request, "param", "etcd")
    return LabStore(lab.start_etcd(), kind)


@pytest.fixture(scope="module")
def make_host(lab, docker_version):
    made = []

    def make(name, dockerd=True, dockerd_args=(), docker_version=docker_version):
        host = lab.add_host(name, docker_version=docker_version)
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


@pytest.fixture(scope="session")
def managed_plugin_dir():
    """``make managed-plugin``'s build/managed-plugin/ (the Debian base is cached)."""
    proc = subprocess.run([os.path.join(ROOT, "scripts", "managed-plugin.sh"), sys.executable],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"scripts/managed-plugin.sh failed:\n{proc.stdout}\n{proc.stderr}")
    with open(os.path.join(ROOT, "build", "managed-plugin", "config.json")) as f:
        config = json.load(f)
    assert config["interface"]["types"] == ["docker.networkdriver/1.0",
                                            "docker.ipamdriver/1.0"]
    assert config["interface"]["socket"] == "netplugin.sock"
    assert config["network"]["type"] == "host"
    assert sorted(config["linux"]["capabilities"]) == ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
    return os.path.join(ROOT, "build", "managed-plugin")
