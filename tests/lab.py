"""A disposable network lab for integration tests (needs root).

The lab never touches the machine's own network namespace and no packet can
leave it:

* every *host* is a network namespace (``<labid>-<name>``) with ``lo`` up, an
  ``eth0`` holding ``10.99.0.(10+N)/24``, a default route ``dev eth0`` with NO
  gateway (so unknown addresses simply get no answer, and proxy ARP works) and
  ``net.ipv4.ip_forward=1``;
* all ``eth0`` are veth pairs whose other end is a port of one bridge living in
  a dedicated *switch* namespace (``<labid>-sw``): one L2 segment;
* every host also has its own persistent mount namespace (``Host.mntns_path``)
  in which ``/run/docker`` is a private per-host directory, ``/run/docker/plugins``
  is ``Host.plugins_dir`` and ``/sys`` is a fresh sysfs of the host's network
  namespace (so ``/sys/class/net`` shows the host's interfaces). A real dockerd
  (with its own containerd) runs there; docker's sandbox netns files
  (``<exec-root>/netns/<id>`` = ``Host.dir/exec/netns/<id>``) are only mounted
  inside that mount namespace, so a network plugin must be started there too:
  use ``Host.spawn`` (or ``Host.run``), which enter both namespaces;
* an optional etcd (v2 API enabled) runs in a *store* namespace on the same
  switch, reachable from every host at ``http://10.99.0.2:2379``.

Everything a run creates is named after a short per-run lab id (``np<pid>``,
plus a letter suffix for further labs of the same process), registered under
``/run/netplugin-lab/<labid>/lab.json`` with the owner PID, and torn down by
``Lab.close()`` (also run from ``atexit`` and from SIGTERM/SIGINT handlers).
Every process started by the lab is put in a tracking cgroup
``netplugin-lab/<labid>/...`` (dockerd's containerd, shims and containers
inherit it; containers get ``--cgroup-parent=/netplugin-lab/<labid>/<host>/docker``)
so killing is reliable even for double-forked shims. Runs whose owner died
(e.g. SIGKILLed pytest) are swept by the next ``Lab.create()``
(or ``sweep_dead_labs()``).

Usage::

    from tests.lab import Lab

    with Lab.create() as lab:
        a = lab.add_host("a")
        b = lab.add_host("b")
        url = lab.start_etcd()                       # http://10.99.0.2:2379
        a.start_dockerd()                            # bb:latest == busybox:latest loaded
        a.run("busybox", "ping", "-c1", "-W2", b.addr)
        a.run("busybox", "wget", "-qO-", url + "/version")
        plugin = a.spawn([sys.executable, "-m", "netplugin.cli", ...],
                         log_path=a.dir + "/plugin.log")
        a.docker("network", "create", "--driver=calico", "net1")
        a.docker("run", "-d", "--name", "c1", "--net", "net1", "busybox", "sleep", "1000")
        a.exec_in_container("c1", "ip", "-o", "addr")
        a.call(requests.get, "http://10.99.0.2:2379/version")   # python, in a's netns

Machine facts this relies on (Debian 12, docker.io 20.10, cgroup v1 hybrid):
start dockerd with ``nsenter`` (``ip netns exec`` remounts /sys and breaks its
cgroups); dockerd 20.10 starts its own containerd with socket
``<exec-root>/containerd/containerd.sock``, state ``<exec-root>/containerd/daemon``
and root ``<data-root>/containerd/daemon`` (no collision between hosts); shims
(``containerd-shim-runc-v2``) re-parent to PID 1 and live in the host's net and
mount namespaces.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref

# --------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------

STATE_ROOT = "/run/netplugin-lab"
CGROUP_NAME = "netplugin-lab"          # top cgroup dir in every hierarchy
SUBNET_PREFIX = "10.99.0."
SUBNET_LEN = 24
STORE_ADDR = SUBNET_PREFIX + "2"
ETCD_PORT = 2379
ETCD_PEER_PORT = 2380

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


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# registry of runs, sweeping of dead runs
# --------------------------------------------------------------------------

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


def _cg_rmdir_top():
    for root in _cgroup_mounts():
        try:
            os.rmdir(os.path.join(root, CGROUP_NAME))
        except OSError:
            pass


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


# --------------------------------------------------------------------------
# the lab
# --------------------------------------------------------------------------

def _busybox_rootfs_tar(cache_dir):
    """Build (once) a tarball of a minimal busybox rootfs; return its path."""
    tar = os.path.join(cache_dir, "busybox-rootfs.tar")
    if os.path.exists(tar):
        return tar
    rootfs = os.path.join(cache_dir, "rootfs")
    shutil.rmtree(rootfs, ignore_errors=True)
    for d in ("bin", "etc", "tmp", "root", "proc", "sys", "dev", "var", "run", "usr"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    os.chmod(os.path.join(rootfs, "tmp"), 0o1777)
    shutil.copy2(os.path.realpath(BUSYBOX), os.path.join(rootfs, "bin", "busybox"))
    applets = _run([BUSYBOX, "--list"]).stdout.split()
    for a in applets:
        if a != "busybox" and "/" not in a:
            os.symlink("busybox", os.path.join(rootfs, "bin", a))
    for link in ("sbin", "usr/bin", "usr/sbin"):
        os.symlink("/bin", os.path.join(rootfs, link))
    with open(os.path.join(rootfs, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    with open(os.path.join(rootfs, "etc", "group"), "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")
    _run(["tar", "-C", rootfs, "-cf", tar + ".tmp", "."])
    os.rename(tar + ".tmp", tar)
    return tar


class Lab:
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

    def add_host(self, name):
        """New host: netns + eth0 on the switch (10.99.0.(10+N)), lo up,
        default route dev eth0 (no gateway), ip_forward=1, own mount ns."""
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
        self.hosts[name] = host
        host._setup()
        return host

    def remove_host(self, host):
        """Tear one host down completely (processes, mounts, netns, cgroups, dir)."""
        if isinstance(host, str):
            host = self.hosts[host]
        host._destroy()
        self.hosts.pop(host.name, None)

    # ---- etcd ---------------------------------------------------------------

    def start_etcd(self, timeout=30):
        """Start etcd (v2 API on) in the store netns; return its URL for hosts."""
        if self._etcd is not None and self._etcd.poll() is None:
            return self.etcd_url
        if not os.path.exists(self.store_netns_path):
            self._netns_add(self.store_netns)
            self._attach(self.store_netns, 0, STORE_ADDR)
        edir = os.path.join(self.dir, "etcd")
        os.makedirs(edir, exist_ok=True)
        client = "http://%s:%d" % (STORE_ADDR, ETCD_PORT)
        peer = "http://127.0.0.1:%d" % ETCD_PEER_PORT
        argv = [NSENTER, "--net=" + self.store_netns_path, ETCD,
                "--name", "lab", "--data-dir", os.path.join(edir, "data"),
                "--listen-client-urls", "%s,http://127.0.0.1:%d" % (client, ETCD_PORT),
                "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "lab=" + peer, "--initial-cluster-state", "new",
                "--enable-v2=true"]
        log_path = os.path.join(edir, "etcd.log")
        self._etcd = self._spawn(argv, log_path, cgroup_rel=os.path.join(CGROUP_NAME, self.labid, "store"))
        self.etcd_url = client
        deadline = time.monotonic() + timeout
        while True:
            if self._etcd.poll() is not None:
                raise LabError("etcd exited (%s); log tail:\n%s" % (self._etcd.returncode, _tail(log_path)))
            try:
                body = call_in_netns(self.store_netns_path, _http_get, STORE_ADDR, ETCD_PORT, "/version", 2)
                if "etcdserver" in body:
                    return client
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LabError("etcd did not answer in %ss; log tail:\n%s" % (timeout, _tail(log_path)))
            time.sleep(0.2)

    def stop_etcd(self):
        """Stop etcd (data dir kept; start_etcd() starts it again)."""
        if self._etcd is not None and self._etcd.poll() is None:
            _stop_popen(self._etcd, signal.SIGTERM, 10)
        self._etcd = None

    def store_run(self, *cmd, check=True, timeout=60):
        """Run a command in the store (etcd) network namespace."""
        return _run([NSENTER, "--net=" + self.store_netns_path] + list(cmd), check=check, timeout=timeout)

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


def _tail(path, n=40):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return "(no log)"


def _http_get(host, port, path, timeout=5):
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (path, host)).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    return data.decode("utf-8", "replace")


def _docker_ping(sock_path, timeout=2):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        data = s.recv(4096)
    except OSError:
        return False
    finally:
        s.close()
    return data.startswith(b"HTTP/") and b" 200 " in data.split(b"\r\n", 1)[0]


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


class Host:
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

    # ---- dockerd ----------------------------------------------------------

    @property
    def dockerd_running(self):
        return self._dockerd is not None and self._dockerd.poll() is None

    @property
    def dockerd_pid(self):
        return self._dockerd.pid if self.dockerd_running else None

    def start_dockerd(self, extra_args=(), timeout=60):
        """Start dockerd inside the host and wait until its API answers;
        make sure bb:latest (alias busybox:latest) is loaded."""
        if self.dockerd_running:
            raise LabError("dockerd already running on %s" % self.name)
        for d in (self.data_root, self.exec_root):
            os.makedirs(d, exist_ok=True)
        cfg = os.path.join(self.dir, "daemon.json")
        if not os.path.exists(cfg):
            with open(cfg, "w") as f:
                f.write("{}\n")
        try:
            os.unlink(self.sock)
        except FileNotFoundError:
            pass
        # After a dockerd crash its containerd dies too (pdeathsig) but may stay a
        # zombie for a while (PID 1 reaps slowly here); dockerd's "containerd is
        # still running" check (kill -0) would then wait forever for its socket.
        cpid = self._containerd_pid()
        if not cpid or not _pid_alive(cpid):
            try:
                os.unlink(os.path.join(self.exec_root, "containerd", "containerd.pid"))
            except OSError:
                pass
        self._dockerd_args = tuple(extra_args)
        argv = self._enter_argv([
            DOCKERD, "--config-file", cfg,
            "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--bridge=none",
            "--storage-driver=vfs", "--data-root", self.data_root,
            "--exec-root", self.exec_root, "--pidfile", os.path.join(self.dir, "docker.pid"),
            "-H", self.docker_host, "--cgroup-parent", self.cgroup_parent,
            "--userland-proxy=false", "--shutdown-timeout=2",
        ] + list(extra_args))
        env = _env({"PATH": DAEMON_PATH, "HOME": self.dir})
        self._dockerd = self.lab._spawn(argv, self.dockerd_log, env=env,
                                        cgroup_rel=os.path.join(self.cgroup_rel, "daemon"))
        deadline = time.monotonic() + timeout
        while not _docker_ping(self.sock):
            if self._dockerd.poll() is not None:
                raise LabError("dockerd on %s exited (%s); log tail:\n%s" % (
                    self.name, self._dockerd.returncode, _tail(self.dockerd_log)))
            if time.monotonic() > deadline:
                raise LabError("dockerd on %s did not answer in %ss; log tail:\n%s" % (
                    self.name, timeout, _tail(self.dockerd_log)))
            time.sleep(0.1)
        self._ensure_image()

    def _ensure_image(self):
        if self.docker("image", "inspect", IMAGE, check=False).returncode != 0:
            tar = _busybox_rootfs_tar(self.lab.cache_dir)
            with open(tar, "rb") as f:
                self.docker("import", "-c", 'CMD ["sh"]', "-", IMAGE, stdin=f)
        for alias in IMAGE_ALIASES:
            self.docker("tag", IMAGE, alias)

    def stop_dockerd(self, kill=False, timeout=30):
        """Stop dockerd: SIGTERM and wait (it stops its containers), or
        kill=True: SIGKILL dockerd only, i.e. a crash: its containerd dies with
        it (pdeathsig) but shims and containers keep running, and a restarted
        dockerd picks them up again."""
        p = self._dockerd
        if p is None or p.poll() is not None:
            return
        cpid = self._containerd_pid()
        if kill:
            _kill(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        else:
            _kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        # The containerd it started got its parent-death signal but may still be
        # exiting; a dockerd started meanwhile would find it "still running",
        # wait for its socket and give up.  Wait until it is gone (or a zombie).
        deadline = time.monotonic() + 15
        while cpid and _pid_alive(cpid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _containerd_pid(self):
        """PID of the containerd this host's dockerd started (0 if unknown)."""
        try:
            with open(os.path.join(self.exec_root, "containerd", "containerd.pid")) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def restart_dockerd(self, extra_args=None, kill=False, timeout=60):
        """stop_dockerd(kill) + start_dockerd (same extra_args unless given)."""
        args = self._dockerd_args if extra_args is None else extra_args
        self.stop_dockerd(kill=kill)
        self.start_dockerd(args, timeout=timeout)

    def docker(self, *args, check=True, timeout=120, input=None, stdin=None):
        """Run the docker 20.10 CLI against this host's dockerd (from the root
        ns: it only needs the unix socket)."""
        env = _env({"DOCKER_CONFIG": self.lab.cli_config_dir})
        return _run([DOCKER, "-H", self.docker_host] + list(args), check=check,
                    timeout=timeout, input=input, stdin=stdin, env=env,
                    text=stdin is None and not isinstance(input, bytes))

    def client(self, timeout=120):
        """docker SDK client for this host's dockerd (closed at lab close)."""
        import docker  # noqa: PLC0415 - optional dependency, only when used
        c = docker.DockerClient(base_url=self.docker_host, version=DOCKER_API_VERSION,
                                timeout=timeout)
        self.lab._clients.append(c)
        return c

    def exec_in_container(self, container, *cmd, check=True, timeout=60):
        """docker exec CONTAINER CMD... -> CompletedProcess."""
        return self.docker("exec", container, *cmd, check=check, timeout=timeout)

    def container_pid(self, container):
        """PID (in the machine's pid ns) of a running container's init."""
        return int(self.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip())
