"""Namespaces and mounts: mountinfo parsing, unmounting, nsfs inodes, netns listing and
deletion, and entering a network namespace from a thread (call_in_netns).
"""

from __future__ import annotations

import ctypes
import os
import re
import threading

from .base import CLONE_NEWNET, IP, _run

def _unescape_mount(path):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _mountinfo(pid="self"):
    """List of (mountpoint, fstype) of a process's mount namespace."""
    out = []
    try:
        with open("/proc/%s/mountinfo" % pid) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                out.append((_unescape_mount(fields[4]), right.split()[0]))
    except OSError:
        pass
    return out


def _under(path, root):
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/")


def _umount_under(root):
    """Lazily unmount every mount at or below root (deepest first)."""
    root = os.path.realpath(root)
    for _ in range(20):
        mps = sorted({mp for mp, _ in _mountinfo() if _under(mp, root)},
                     key=lambda p: p.count("/"), reverse=True)
        if not mps:
            return True
        for mp in mps:
            _run(["umount", "-l", mp], check=False)
    return not any(_under(mp, root) for mp, _ in _mountinfo())


_NSFS_DEV = None


def _ns_inode(path):
    """Inode of a namespace file (bind-mounted nsfs), or None if it is not one."""
    global _NSFS_DEV
    if _NSFS_DEV is None:
        _NSFS_DEV = os.stat("/proc/self/ns/net").st_dev
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino if st.st_dev == _NSFS_DEV else None


def _ns_members(net_inodes=(), mnt_inodes=()):
    """PIDs whose net or mount namespace is one of the given inodes."""
    want = {"net:[%d]" % i for i in net_inodes if i} | {"mnt:[%d]" % i for i in mnt_inodes if i}
    found = set()
    if not want:
        return found
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        if pid <= 1 or pid == me:
            continue
        for ns in ("net", "mnt"):
            try:
                if os.readlink("/proc/%d/ns/%s" % (pid, ns)) in want:
                    found.add(pid)
                    break
            except OSError:
                break
    return found


def _netns_list():
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def _netns_delete(name):
    path = "/run/netns/" + name
    if not os.path.lexists(path):
        return
    _run([IP, "netns", "del", name], check=False)
    if os.path.lexists(path):
        _run(["umount", "-l", path], check=False)
        try:
            os.unlink(path)
        except OSError:
            pass


_libc = None


def _setns(fd, nstype):
    global _libc
    if hasattr(os, "setns"):
        os.setns(fd, nstype)
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def call_in_netns(netns_path, fn, *args, **kwargs):
    """Run fn(*args, **kwargs) in a fresh thread that first enters netns_path.

    Sockets created by fn belong to that network namespace; the calling thread
    (and thus the rest of the test process) never changes namespace.
    Returns fn's result or re-raises its exception.
    """
    box = {}

    def target():
        try:
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                _setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in caller
            box["error"] = e

    t = threading.Thread(target=target, name="lab-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")
