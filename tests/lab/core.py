"""The Lab: registering a run, the switch namespace and bridge, adding/removing hosts,
and closing it all; plus missing_prerequisites() for skipping when the lab cannot run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from .base import (BUSYBOX, DOCKER, DOCKERD, ETCD, HOSTNAME_RE, IP, NSENTER,
                   RESERVED_NAMES, STATE_ROOT, SUBNET_LEN, UNSHARE, CGROUP_NAME,
                   LabError, _env, _proc_starttime, _run)
from .cgroups import _cg_make, _cg_rmdir_top, _cgroup_mounts
from .cleanup import _OPEN_LABS, _StateLock, _destroy_lab, _install_safety_net, sweep_dead_labs
from .etcd import EtcdMixin
from .hosts import Host
from .netns import _netns_list

def missing_prerequisites():
    """Human-readable list of what is missing to run the lab here (empty = OK)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("not running as root")
    for p in (DOCKERD, DOCKER, "/usr/bin/containerd", ETCD, NSENTER, UNSHARE, IP, BUSYBOX):
        if not os.access(p, os.X_OK):
            missing.append("missing executable " + p)
    if not _cgroup_mounts():
        missing.append("no cgroup filesystem mounted")
    return missing


class Lab(EtcdMixin):
    """A set of hosts (netns + mount ns + dockerd) on one switch, plus etcd.

    Create with ``Lab.create()`` (sweeps dead runs first); use as a context
    manager or call ``close()`` (idempotent). Attributes: ``labid``, ``dir``
    (lab directory), ``hosts`` (name -> Host), ``switch_netns``,
    ``etcd_url`` (after start_etcd), ``store_netns`` / ``store_netns_path``.
    """

    def __init__(self, labid, labdir, statedir):
        self.labid = labid
        self.dir = labdir
        self.statedir = statedir
        self.hosts = {}
        self.switch_netns = labid + "-sw"
        self.bridge = labid + "br"
        self.store_netns = labid + "-store"
        self.store_netns_path = "/run/netns/" + self.store_netns
        self.etcd_url = None
        self._etcd = None
        self._popens = []
        self._clients = []
        self._next_index = 1
        self._closed = False
        self._lock = threading.RLock()
        self.cache_dir = os.path.join(labdir, "cache")
        self.cli_config_dir = os.path.join(labdir, "cli")

    # ---- creation -------------------------------------------------------

    @classmethod
    def create(cls, tmp_root=None, state_root=STATE_ROOT, log=None):
        """Sweep dead runs, register a new run and build the switch namespace.

        tmp_root: parent of the lab directory (default: the state dir itself,
        /run/netplugin-lab/<labid>). Keep it short: unix socket paths below it
        must stay < 108 chars.
        """
        missing = missing_prerequisites()
        if missing:
            raise LabError("lab prerequisites missing: " + "; ".join(missing))
        sweep_dead_labs(state_root, log=log)
        with _StateLock(state_root):
            base = "np%d" % (os.getpid() % 100000)
            suffixes = [""] + [chr(c) for c in range(ord("b"), ord("z") + 1)]
            for sfx in suffixes:
                labid = base + sfx
                statedir = os.path.join(state_root, labid)
                if not os.path.exists(statedir) and not any(
                        n.startswith(labid + "-") for n in _netns_list()):
                    break
            else:
                raise LabError("no free lab id for pid %d" % os.getpid())
            labdir = os.path.join(tmp_root, labid) if tmp_root else statedir
            os.makedirs(statedir)
            os.makedirs(labdir, exist_ok=True)
            with open(os.path.join(statedir, "lab.json"), "w") as f:
                json.dump({"labid": labid, "owner_pid": os.getpid(),
                           "owner_start": _proc_starttime(os.getpid()),
                           "labdir": os.path.realpath(labdir),
                           "created": time.time()}, f)
            _cg_make(os.path.join(CGROUP_NAME, labid, "lab"))
        lab = cls(labid, os.path.realpath(labdir), statedir)
        _OPEN_LABS.add(lab)
        _install_safety_net()
        try:
            lab._setup()
        except BaseException:
            lab.close()
            raise
        return lab

    def _setup(self):
        # a private bind mount of the lab dir: nsfs files (mntns) can be bound
        # there and nothing propagates to/from the rest of the system
        _run(["mount", "--bind", self.dir, self.dir])
        _run(["mount", "--make-private", self.dir])
        os.makedirs(self.cache_dir, exist_ok=True)
        os.makedirs(self.cli_config_dir, exist_ok=True)
        self._netns_add(self.switch_netns)
        sw = self.switch_netns
        _run([IP, "-n", sw, "link", "set", "lo", "up"])
        _run([IP, "-n", sw, "link", "add", self.bridge, "type", "bridge"])
        _run([IP, "-n", sw, "link", "set", self.bridge, "up"])

    def _netns_add(self, name):
        _run([IP, "netns", "add", name])
        return "/run/netns/" + name

    def _record_pid(self, pid):
        with open(os.path.join(self.statedir, "pids"), "a") as f:
            f.write("%d %s\n" % (pid, _proc_starttime(pid) or 0))

    def _attach(self, netns, index, addr):
        """veth eth0 in `netns` <-> port on the switch bridge; never in root ns."""
        port = "%sp%d" % (self.labid, index)
        _run([IP, "-n", self.switch_netns, "link", "add", port, "type", "veth",
              "peer", "name", "eth0", "netns", netns])
        _run([IP, "-n", self.switch_netns, "link", "set", port, "master", self.bridge])
        _run([IP, "-n", self.switch_netns, "link", "set", port, "up"])
        _run([IP, "-n", netns, "link", "set", "lo", "up"])
        _run([IP, "-n", netns, "addr", "add", "%s/%d" % (addr, SUBNET_LEN), "dev", "eth0"])
        _run([IP, "-n", netns, "link", "set", "eth0", "up"])
        _run([IP, "-n", netns, "route", "add", "default", "dev", "eth0"])

    def _spawn(self, argv, log_path, env=None, cgroup_rel=None, cwd=None):
        """Start a long-running process (own session, tracked cgroup, recorded pid)."""
        argv = [str(a) for a in argv]
        procs = _cg_make(cgroup_rel) if cgroup_rel else None
        if procs:
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" 2>/dev/null; exec "$@"', procs] + argv
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "ab") as logf:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                 stderr=subprocess.STDOUT, env=env if env is not None else _env(),
                                 cwd=cwd or "/", start_new_session=True)
        with self._lock:
            self._popens.append(p)
        self._record_pid(p.pid)
        return p

    # ---- hosts ------------------------------------------------------------

    def add_host(self, name, docker_version=None):
        """New host: netns + eth0 on the switch (10.99.0.(10+N)), lo up,
        default route dev eth0 (no gateway), ip_forward=1, own mount ns.
        docker_version: the Docker its start_dockerd() runs (default 20.10)."""
        if self._closed:
            raise LabError("lab is closed")
        if not HOSTNAME_RE.match(name) or name in RESERVED_NAMES:
            raise ValueError("bad host name %r (want [a-z][a-z0-9]{0,7})" % name)
        if name in self.hosts:
            raise ValueError("host %r exists" % name)
        with self._lock:
            index = self._next_index
            self._next_index += 1
        if 10 + index > 254:
            raise LabError("too many hosts")
        host = Host(self, name, index)
        if docker_version is not None:
            host.docker_version = str(docker_version)
        self.hosts[name] = host
        host._setup()
        return host

    def remove_host(self, host):
        """Tear one host down completely (processes, mounts, netns, cgroups, dir)."""
        if isinstance(host, str):
            host = self.hosts[host]
        host._destroy()
        self.hosts.pop(host.name, None)

    # ---- teardown -------------------------------------------------------

    def close(self):
        """Kill every lab process, unmount, delete netns/cgroups/dirs. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for c in self._clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        problems = _destroy_lab(self.labid, self.dir, self.statedir, popens=self._popens)
        _OPEN_LABS.discard(self)
        try:
            with _StateLock(os.path.dirname(self.statedir)):
                if not [d for d in os.listdir(os.path.dirname(self.statedir)) if not d.startswith(".")]:
                    _cg_rmdir_top()
        except OSError:
            pass
        if problems:
            sys.stderr.write("lab %s: cleanup problems: %s\n" % (self.labid, "; ".join(problems)))
        self.cleanup_problems = problems

    @property
    def closed(self):
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<Lab %s hosts=%s>" % (self.labid, sorted(self.hosts))
