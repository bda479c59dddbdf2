"""One lab host: its network namespace on the switch, its persistent mount namespace,
running and spawning commands inside both; its dockerd part comes from docker.DockerdMixin.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from .base import (CGROUP_NAME, IP, NSENTER, SUBNET_PREFIX, UNSHARE, LabError,
                   _env, _kill, _run, _stop_popen)
from .cgroups import _cg_make, _cg_procs, _cg_rmdir
from .docker import DockerdMixin
from .netns import (_mountinfo, _netns_delete, _ns_inode, _ns_members, _umount_under,
                    _under, call_in_netns)

class Host(DockerdMixin):
    """One lab host. Attributes:

    name, index, netns (name), netns_path, addr (lab IPv4), dir (state dir),
    mntns_path (persistent mount namespace file), plugins_dir (= /run/docker/plugins
    inside the host), sock (dockerd socket), docker_host ("unix://" + sock),
    dockerd_log, cgroup_parent (containers' cgroup parent).
    """

    def __init__(self, lab, name, index):
        self.lab = lab
        self.name = name
        self.index = index
        self.netns = "%s-%s" % (lab.labid, name)
        self.netns_path = "/run/netns/" + self.netns
        self.addr = SUBNET_PREFIX + str(10 + index)
        self.dir = os.path.join(lab.dir, name)
        self.mntns_path = os.path.join(self.dir, "mntns")
        self.plugins_dir = os.path.join(self.dir, "plugins")
        self.run_docker_dir = os.path.join(self.dir, "run-docker")
        self.sock = os.path.join(self.dir, "docker.sock")
        self.docker_host = "unix://" + self.sock
        self.dockerd_log = os.path.join(self.dir, "dockerd.log")
        self.data_root = os.path.join(self.dir, "data")
        self.exec_root = os.path.join(self.dir, "exec")
        self.cgroup_rel = os.path.join(CGROUP_NAME, lab.labid, name)
        self.cgroup_parent = "/" + os.path.join(self.cgroup_rel, "docker")
        self._dockerd = None
        self._dockerd_args = ()
        self._spawned = []

    def __repr__(self):
        return "<Host %s %s netns=%s>" % (self.name, self.addr, self.netns)

    # ---- setup / teardown --------------------------------------------------

    def _setup(self):
        for d in (self.dir, self.plugins_dir, self.run_docker_dir, os.path.join(self.dir, "logs")):
            os.makedirs(d, exist_ok=True)
        open(self.mntns_path, "a").close()
        self.lab._netns_add(self.netns)
        self.lab._attach(self.netns, self.index, self.addr)
        _run([NSENTER, "--net=" + self.netns_path, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self._make_mount_ns()

    def _make_mount_ns(self):
        """Persistent mount ns: private /run/docker, plugins dir, own sysfs."""
        newsys = os.path.join(self.dir, ".sys")
        os.makedirs(newsys, exist_ok=True)
        # direct sub-mounts of /sys (cgroup, bpf, securityfs...) are moved onto
        # the fresh sysfs so that dockerd/runc still find the cgroup hierarchies
        subs = sorted({mp for mp, _ in _mountinfo()
                       if mp.startswith("/sys/") and mp.count("/") >= 2
                       and not any(mp.startswith(o + "/") for o, _ in _mountinfo()
                                   if o.startswith("/sys/"))})
        moves = "\n".join('mount --move "%s" "%s%s"' % (s, newsys, s[len("/sys"):]) for s in subs)
        script = """set -e
# drop copies of other namespaces' nsfs mounts (they would keep them alive)
for m in $(grep ' - nsfs ' /proc/self/mountinfo | cut -d' ' -f5); do umount -l "$m" 2>/dev/null || true; done
mkdir -p /run/docker
mount --bind "{rd}" /run/docker
mkdir -p /run/docker/plugins
mount --bind "{pd}" /run/docker/plugins
mount -t sysfs sysfs "{ns}"
{moves}
umount -l /sys
mount --move "{ns}" /sys
""".format(rd=self.run_docker_dir, pd=self.plugins_dir, ns=newsys, moves=moves)
        _run([NSENTER, "--net=" + self.netns_path, UNSHARE, "--mount=" + self.mntns_path,
              "--propagation", "private", "sh", "-c", script])
        if _ns_inode(self.mntns_path) is None:
            raise LabError("mount namespace of %s was not persisted" % self.name)

    def _destroy(self):
        if self._dockerd is not None and self._dockerd.poll() is None:
            self.stop_dockerd(kill=True)
        net_ino = _ns_inode(self.netns_path)
        mnt_ino = _ns_inode(self.mntns_path)
        deadline = time.monotonic() + 15
        popens = [p for p in self._spawned] + ([self._dockerd] if self._dockerd else [])
        while time.monotonic() < deadline:
            victims = _cg_procs(self.cgroup_rel) | _ns_members([net_ino], [mnt_ino])
            victims |= {p.pid for p in popens if p.poll() is None}
            if not victims:
                break
            for pid in victims:
                _kill(pid)
            time.sleep(0.05)
        for p in popens:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _umount_under(self.dir)
        _netns_delete(self.netns)
        _cg_rmdir(self.cgroup_rel)
        if not any(_under(mp, self.dir) for mp, _ in _mountinfo()):
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- running things inside the host ----------------------------------

    def _enter_argv(self, cmd, cwd=None):
        argv = [NSENTER, "--net=" + self.netns_path, "--mount=" + self.mntns_path]
        if cwd:
            argv.append("--wdns=" + cwd)
        return argv + [str(c) for c in cmd]

    def run(self, *cmd, check=True, timeout=60, input=None, env=None, cwd=None):
        """Run cmd inside the host (net + mount ns); CompletedProcess with text
        stdout/stderr. Raises LabCommandError (with output) if check and rc != 0."""
        procs = _cg_make(os.path.join(self.cgroup_rel, "cmd"))
        argv = self._enter_argv(cmd, cwd)
        if procs:
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" 2>/dev/null; exec "$@"', procs] + argv
        return _run(argv, check=check, timeout=timeout, input=input, env=_env(env),
                    shown=["[%s]" % self.name] + [str(c) for c in cmd])

    def sh(self, script, **kw):
        """run("sh", "-c", script)."""
        return self.run("sh", "-c", script, **kw)

    def ip(self, *args, **kw):
        """run("ip", *args)."""
        return self.run(IP, *args, **kw)

    def call(self, fn, *args, **kwargs):
        """Call a Python function in a thread inside this host's network ns."""
        return call_in_netns(self.netns_path, fn, *args, **kwargs)

    def spawn(self, cmd, log_path=None, env=None, cwd=None):
        """Start a long-running process inside the host (net + mount ns), in
        its own session, output to log_path (default DIR/logs/<prog>-<n>.log).
        It is killed at lab close; stop it earlier with stop_process()."""
        cmd = [str(c) for c in cmd]
        if log_path is None:
            log_path = os.path.join(self.dir, "logs", "%s-%d.log" % (
                os.path.basename(cmd[0]), len(self._spawned) + 1))
        p = self.lab._spawn(self._enter_argv(cmd, cwd), log_path, env=_env(env),
                            cgroup_rel=os.path.join(self.cgroup_rel, "spawn"))
        p.log_path = log_path
        self._spawned.append(p)
        return p

    def stop_process(self, p, sig=signal.SIGTERM, timeout=10):
        """Signal a spawned process's group, wait, SIGKILL after timeout."""
        return _stop_popen(p, sig, timeout)
