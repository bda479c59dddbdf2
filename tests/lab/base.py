"""Constants, errors and process helpers shared by every lab module: the lab's fixed
names and paths, LabError/LabCommandError, _run, pid and log helpers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess

STATE_ROOT = "/run/netplugin-lab"
CGROUP_NAME = "netplugin-lab"          # top cgroup dir in every hierarchy
SUBNET_PREFIX = "10.99.0."
SUBNET_LEN = 24
STORE_ADDR = SUBNET_PREFIX + "2"
ETCD_PORT = 2379
ETCD_PEER_PORT = 2380

# Docker 20.10 (bookworm's); other versions: docker_versions.docker_install(version)
DOCKER = "/usr/bin/docker"             # 20.10 client (the one first on PATH is 28.x)
DOCKERD = "/usr/sbin/dockerd"
DOCKER_API_VERSION = "1.41"
ETCD = shutil.which("etcd", path="/usr/bin:/usr/local/bin:/bin") or "/usr/bin/etcd"
BUSYBOX = "/bin/busybox"
NSENTER = shutil.which("nsenter", path="/usr/bin:/bin") or "/usr/bin/nsenter"
UNSHARE = shutil.which("unshare", path="/usr/bin:/bin") or "/usr/bin/unshare"
IP = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") or "/usr/sbin/ip"
SYS_PATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
DAEMON_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"   # no /usr/local: keep dockerd on distro binaries

IMAGE = "bb:latest"
IMAGE_ALIASES = ("busybox:latest",)

LABID_RE = re.compile(r"^np\d+[a-z]*$")
NETNS_RE = re.compile(r"^(np\d+[a-z]*)-")
HOSTNAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
RESERVED_NAMES = {"sw", "store", "cache", "etcd", "cli"}

CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """Something in the lab could not be set up."""


class LabCommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the command's output."""

    def __str__(self):
        def tail(s):
            if s is None:
                return ""
            if isinstance(s, bytes):
                s = s.decode("utf-8", "replace")
            s = s.strip()
            return s[-3000:]
        return "%s\n--- stdout ---\n%s\n--- stderr ---\n%s" % (
            super().__str__(), tail(self.stdout), tail(self.stderr))


def _env(extra=None):
    env = dict(os.environ)
    path = env.get("PATH", "")
    env["PATH"] = SYS_PATH + (":" + path if path else "")
    for k in ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH"):
        env.pop(k, None)
    if extra:
        env.update(extra)
    return env


def _run(argv, check=True, timeout=60, input=None, stdin=None, env=None, text=True, shown=None):
    """subprocess.run with captured output; raises LabCommandError on failure
    (reporting `shown` as the command if given)."""
    argv = [str(a) for a in argv]
    shown = argv if shown is None else shown
    if input is not None and isinstance(input, bytes):
        text = False
    try:
        cp = subprocess.run(argv, input=input, stdin=stdin, capture_output=True,
                            timeout=timeout, env=env if env is not None else _env(),
                            text=text, errors="replace" if text else None)
    except subprocess.TimeoutExpired as e:
        raise LabCommandError(-9, shown, e.stdout, e.stderr) from e
    if check and cp.returncode != 0:
        raise LabCommandError(cp.returncode, shown, cp.stdout, cp.stderr)
    return cp


def _proc_starttime(pid):
    """Start time (clock ticks since boot) of pid, or None if gone/zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except (OSError, ValueError):
        return None
    rest = data[data.rfind(")") + 2:].split()
    if rest[0] in ("Z", "X"):
        return None
    return int(rest[19])


def _pid_alive(pid, starttime=None):
    st = _proc_starttime(pid)
    if st is None:
        return False
    return starttime is None or st == starttime


def _kill(pid, sig=signal.SIGKILL):
    if pid <= 1 or pid == os.getpid():
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _tail(path, n=40):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return "(no log)"


def _stop_popen(p, sig=signal.SIGTERM, timeout=10):
    if p.poll() is not None:
        return p.returncode
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        _kill(p.pid, sig)
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            _kill(p.pid)
        return p.wait(timeout=10)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_pids(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    out.append((int(parts[0]), int(parts[1])))
    except (OSError, ValueError):
        pass
    return out
