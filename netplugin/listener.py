"""The plugin's unix socket: who may connect, made safely.
Owns the socket's creation, mode, group and directory checks for both server modes.

Docker talks to the plugin over one unix socket; whoever can connect to it
can program the host's routes, veths and firewall through the root plugin.
So the socket is created

* mode 0660, owner root (the plugin's user), group ``socket_group`` (default:
  ``docker`` when that group exists, else root's group): the users Docker
  itself trusts;
* with no moment of wider rights: bound under umask 0177 (mode 0600), then
  given its group and mode 0660, and only then listening;
* only in a directory nobody else may write to (a world- or foreign-group-
  writable directory would let a local user swap the socket for their own):
  such a directory refuses the start with a one-line error.

Both server modes use the same listener: waitress serves it in the one
process mode, gunicorn gets its file descriptor (``fd://N``) for workers > 1.
There is no TCP listener for the Docker protocol.
"""
from __future__ import annotations

import grp
import os
import socket
import stat
import time
from typing import Optional

from netplugin.errors import ConfigError

SOCKET_MODE = 0o660
DEFAULT_GROUP = "docker"
BIND_UMASK = 0o177


def socket_gid(group: str) -> int:
    """The socket's group: ``group`` by name or number; "" = ``docker`` when
    it exists, else root's group (0)."""
    if not group:
        try:
            return grp.getgrnam(DEFAULT_GROUP).gr_gid
        except KeyError:
            return 0
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group {group!r} is not a group on this host "
                          f"(see /etc/group)") from None


def check_directory(directory: str) -> None:
    """Refuse a socket directory others may write to (or that is not a
    directory); make it (0755) if missing."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{directory}: the socket's directory is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{directory}: the socket's directory belongs to uid {st.st_uid}, "
                          f"not root: refusing to serve there")
    if mode & stat.S_IWOTH or (mode & stat.S_IWGRP and st.st_gid not in (0, os.getegid())):
        raise ConfigError(f"{directory}: the socket's directory is writable by others "
                          f"(mode {mode:04o}): refusing to serve there; "
                          f"chmod go-w {directory}")


def _serving(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def clear_path(path: str, attempts: int = 3, pause: float = 0.5) -> None:
    """Refuse to steal a socket someone serves on; remove a stale one.  A
    plugin that was just killed may still answer for a moment (its workers
    die with it): look ``attempts`` times."""
    for _ in range(attempts - 1):
        if not os.path.lexists(path) or not _serving(path):
            break
        time.sleep(pause)
    if not os.path.lexists(path):
        return
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path}: exists and is not a socket; refusing to replace it")
    if _serving(path):
        raise ConfigError(f"{path}: another process is already serving on this socket")
    os.unlink(path)  # nobody answers: a leftover of a killed plugin


def open_listener(path: str, group: str = "", backlog: int = 128,
                  gid: Optional[int] = None) -> socket.socket:
    """The listening socket at ``path``, mode 0660, owner root, group
    ``group`` (see the module docstring)."""
    directory = os.path.dirname(path) or "."
    check_directory(directory)
    if gid is None:
        gid = socket_gid(group)
    clear_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(BIND_UMASK)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chown(path, os.geteuid(), gid)
        os.chmod(path, SOCKET_MODE)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{path}: cannot serve on this socket: {exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock
