"""Tracking cgroups: every lab process lives under netplugin-lab/<labid>/...; finding
the hierarchies, creating, listing the processes of and removing those cgroups.
"""

from __future__ import annotations

import errno
import os
import time

from .base import CGROUP_NAME
from .netns import _mountinfo

def _cgroup_mounts():
    """Mount points of all cgroup (v1 and v2) hierarchies."""
    return sorted({mp for mp, fs in _mountinfo() if fs in ("cgroup", "cgroup2")})


def _tracking_cgroup_root():
    """Hierarchy used to track lab processes: v1 'pids' if present, else cgroup2."""
    mounts = _cgroup_mounts()
    for mp, fs in _mountinfo():
        if fs == "cgroup" and os.path.basename(mp) == "pids":
            return mp
    for mp, fs in _mountinfo():
        if fs == "cgroup2":
            return mp
    return mounts[0] if mounts else None


def _cg_procs(rel):
    """PIDs in cgroup tree `rel` (relative to hierarchy roots), all hierarchies."""
    pids = set()
    for root in _cgroup_mounts():
        top = os.path.join(root, rel)
        if not os.path.isdir(top):
            continue
        for dirpath, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(dirpath, "cgroup.procs")) as f:
                        pids.update(int(x) for x in f.read().split())
                except (OSError, ValueError):
                    pass
    pids.discard(os.getpid())
    return pids


def _cg_rmdir(rel):
    """rmdir the cgroup tree `rel` bottom-up in all hierarchies. True if all gone."""
    ok = True
    for root in _cgroup_mounts():
        top = os.path.join(root, rel)
        if not os.path.isdir(top):
            continue
        for dirpath, _dirs, _files in sorted(os.walk(top, topdown=False),
                                             key=lambda t: t[0].count("/"), reverse=True):
            for _ in range(50):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        ok = False
                        break
                    time.sleep(0.05)
            else:
                ok = False
    return ok


def _cg_make(rel):
    """Create cgroup `rel` in the tracking hierarchy; return its cgroup.procs path."""
    root = _tracking_cgroup_root()
    if root is None:
        return None
    path = os.path.join(root, rel)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    procs = os.path.join(path, "cgroup.procs")
    return procs if os.path.exists(procs) else None


def _cg_rmdir_top():
    for root in _cgroup_mounts():
        try:
            os.rmdir(os.path.join(root, CGROUP_NAME))
        except OSError:
            pass
