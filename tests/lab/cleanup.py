"""Teardown: destroying one run's leftovers, sweeping runs whose owner died, and the
process-wide safety net (atexit + SIGTERM/SIGINT/SIGHUP close every open lab).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref

from .base import (CGROUP_NAME, LABID_RE, NETNS_RE, STATE_ROOT, _kill, _pid_alive,
                   _read_json, _read_pids)
from .cgroups import _cg_procs, _cg_rmdir, _cg_rmdir_top, _cgroup_mounts
from .netns import (_mountinfo, _netns_delete, _netns_list, _ns_inode, _ns_members,
                    _umount_under, _under)

class _StateLock:
    def __init__(self, state_root):
        self.path = os.path.join(state_root, ".lock")
        self.fd = None

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _destroy_lab(labid, labdir, statedir, popens=(), log=None):
    """Kill, unmount, delete everything belonging to lab `labid`. Best effort.

    Returns a list of problems (empty if everything is gone).
    """
    problems = []
    netns_names = [n for n in _netns_list() if n.startswith(labid + "-")]
    net_inodes = {_ns_inode("/run/netns/" + n) for n in netns_names} - {None}
    mnt_inodes = set()
    if labdir and os.path.isdir(labdir):
        for entry in os.listdir(labdir):
            ino = _ns_inode(os.path.join(labdir, entry, "mntns"))
            if ino:
                mnt_inodes.add(ino)
    recorded = _read_pids(os.path.join(statedir, "pids")) if statedir else []
    cg_rel = os.path.join(CGROUP_NAME, labid)

    # 1. kill every process: tracking cgroup, recorded pids, namespace members
    deadline = time.monotonic() + 20
    while True:
        victims = _cg_procs(cg_rel)
        victims |= {p for p, st in recorded if _pid_alive(p, st)}
        victims |= _ns_members(net_inodes, mnt_inodes)
        victims = {p for p in victims if p > 1 and p != os.getpid() and _pid_alive(p)}
        for p in popens:
            if p.poll() is None:
                victims.add(p.pid)
        if not victims:
            break
        if time.monotonic() > deadline:
            problems.append("processes survived SIGKILL: %s" % sorted(victims))
            break
        for pid in victims:
            _kill(pid)
        for p in popens:
            try:
                p.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.05)
    for p in popens:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    # 2. unmount everything below the lab dir (mntns files, private bind mount)
    if labdir and os.path.exists(labdir):
        if not _umount_under(labdir):
            problems.append("mounts remain under %s" % labdir)

    # 3. network namespaces
    for n in netns_names:
        _netns_delete(n)
    left = [n for n in _netns_list() if n.startswith(labid + "-")]
    if left:
        problems.append("netns remain: %s" % left)

    # 4. cgroups (ours, plus docker-default ones for containers of this lab)
    container_ids = set()
    if labdir and os.path.isdir(labdir):
        for entry in os.listdir(labdir):
            cdir = os.path.join(labdir, entry, "data", "containers")
            if os.path.isdir(cdir):
                container_ids.update(os.listdir(cdir))
    for root in _cgroup_mounts():
        for cid in container_ids:
            for rel in ("docker/" + cid, "system.slice/docker-%s.scope" % cid):
                path = os.path.join(root, rel)
                if os.path.isdir(path):
                    try:
                        with open(os.path.join(path, "cgroup.procs")) as f:
                            for pid in f.read().split():
                                _kill(int(pid))
                    except OSError:
                        pass
                    _cg_rmdir(rel)
    if not _cg_rmdir(cg_rel):
        problems.append("cgroup %s could not be removed" % cg_rel)

    # 5. files (only when nothing is mounted below any more!)
    for d in (labdir, statedir):
        if d and os.path.exists(d):
            if any(_under(mp, os.path.realpath(d)) for mp, _ in _mountinfo()):
                problems.append("not removing %s: still mounted" % d)
                continue
            shutil.rmtree(d, ignore_errors=True)
            if os.path.exists(d):
                problems.append("could not remove %s" % d)
    if log and problems:
        log("lab %s cleanup problems: %s" % (labid, "; ".join(problems)))
    return problems


def sweep_dead_labs(state_root=STATE_ROOT, log=None):
    """Destroy leftovers of lab runs whose owner process is gone.

    Also removes orphan ``np<N>-*`` netns and ``netplugin-lab/<labid>`` cgroups
    that have no registered run at all. Returns the swept lab ids.
    """
    swept = []
    os.makedirs(state_root, exist_ok=True)
    with _StateLock(state_root):
        live = set()
        for labid in sorted(os.listdir(state_root)):
            statedir = os.path.join(state_root, labid)
            if labid.startswith(".") or not os.path.isdir(statedir):
                continue
            info = _read_json(os.path.join(statedir, "lab.json")) or {}
            owner = info.get("owner_pid")
            if owner and _pid_alive(owner, info.get("owner_start")):
                live.add(labid)
                continue
            labdir = info.get("labdir") or statedir
            _destroy_lab(labid, labdir, statedir, log=log)
            swept.append(labid)
        # orphans without any registration
        orphan_ids = set()
        for n in _netns_list():
            m = NETNS_RE.match(n)
            if m:
                orphan_ids.add(m.group(1))
        for root in _cgroup_mounts():
            top = os.path.join(root, CGROUP_NAME)
            if os.path.isdir(top):
                orphan_ids.update(d for d in os.listdir(top) if LABID_RE.match(d))
        for labid in sorted(orphan_ids - live - set(swept)):
            if os.path.isdir(os.path.join(state_root, labid)):
                continue
            _destroy_lab(labid, None, None, log=log)
            swept.append(labid)
        if not live:
            _cg_rmdir_top()
    return swept


# --------------------------------------------------------------------------
# process-wide safety net: atexit + signals
# --------------------------------------------------------------------------

_OPEN_LABS = weakref.WeakSet()
_HANDLERS_INSTALLED = False
_PREV_HANDLERS = {}


def _close_all_labs():
    for lab in list(_OPEN_LABS):
        try:
            lab.close()
        except Exception as e:  # noqa: BLE001
            sys.stderr.write("lab: cleanup of %s failed: %r\n" % (lab.labid, e))


def _signal_handler(signum, frame):
    _close_all_labs()
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)           # e.g. SIGINT -> KeyboardInterrupt
    elif prev != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_safety_net():
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_close_all_labs)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            prev = signal.getsignal(sig)
            if prev == signal.SIG_IGN or prev is None:
                continue              # respect ignored signals (e.g. SIGINT under nohup/&)
            _PREV_HANDLERS[sig] = prev
            signal.signal(sig, _signal_handler)
        except (ValueError, OSError):
            pass
