"""Docker versions for the lab: bookworm's own 20.10, and trixie's 26 / sid's 28 fetched with
apt-get download into a cache directory (never installed into the system).

``docker_install(version)`` returns a ``DockerInstall`` (dockerd, CLI, PATH for the daemon,
API version) or raises ``DockerUnavailable`` with the reason.  A newer version is fetched on
first use: an apt sources list of its own (the machine's Debian mirror, read from its apt
sources, with suite trixie or sid), ``apt-get update`` / ``apt-get download docker.io
containerd docker-cli`` with private lists and cache dirs, then ``dpkg-deb -x`` of each
package into ``<cache>/<version>/root``.  dockerd, containerd, the shims and the CLI run on
bookworm's glibc; runc is not fetched (trixie's needs a newer glibc): bookworm's /usr/sbin/runc
stays on the daemon's PATH after the fetched bin dirs.

Cache: ``$NETPLUGIN_DOCKER_CACHE`` or ``/var/cache/netplugin-lab/docker-versions`` (survives
runs and checkouts; ``make clean`` does not remove it).  Versions used by the integration
tests: ``$NETPLUGIN_DOCKER_VERSIONS`` (comma-separated, default all of ``VERSIONS``).

Command line (``scripts/docker-versions.sh`` calls it)::

    python -m tests.lab.docker_versions fetch [VERSION...]   # default: every version
    python -m tests.lab.docker_versions show [VERSION...]
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

DEFAULT_VERSION = "20.10"

#: version -> (Debian suite it comes from or None for the system's, API version it speaks)
VERSIONS = {
    "20.10": (None, "1.41"),
    "26": ("trixie", "1.45"),
    "28": ("sid", "1.51"),
}
PACKAGES = ("docker.io", "containerd", "docker-cli")
CACHE_ENV = "NETPLUGIN_DOCKER_CACHE"
VERSIONS_ENV = "NETPLUGIN_DOCKER_VERSIONS"
DEFAULT_CACHE = "/var/cache/netplugin-lab/docker-versions"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"   # no /usr/local: keep dockerd on distro binaries
APT_TIMEOUT = 900


class DockerUnavailable(RuntimeError):
    """This Docker version cannot be used here (the message says why)."""


@dataclass(frozen=True)
class DockerInstall:
    """Where one Docker version's binaries are.  ``daemon_path`` is PATH for dockerd
    (it finds containerd, containerd-shim-runc-v2, runc and docker-proxy there)."""
    version: str
    dockerd: str
    docker: str
    containerd: str
    api_version: str
    daemon_path: str
    root: str = ""
    packages: dict = field(default_factory=dict)

    @property
    def full_version(self):
        """dockerd --version's number, e.g. '26.1.5+dfsg1'."""
        out = subprocess.run([self.dockerd, "--version"], capture_output=True, text=True,
                             timeout=30, env={"PATH": self.daemon_path}).stdout
        m = re.search(r"version ([^,\s]+)", out)
        return m.group(1) if m else "?"


def cache_dir():
    return os.environ.get(CACHE_ENV) or DEFAULT_CACHE


def selected_versions(value=None):
    """Versions named by ``value`` (or $NETPLUGIN_DOCKER_VERSIONS; default all), in
    VERSIONS order.  Unknown names raise ValueError."""
    if value is None:
        value = os.environ.get(VERSIONS_ENV, "")
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or names == ["all"]:
        return list(VERSIONS)
    bad = [v for v in names if v not in VERSIONS]
    if bad:
        raise ValueError("unknown Docker version(s) %s (known: %s)" % (
            ", ".join(bad), ", ".join(VERSIONS)))
    return [v for v in VERSIONS if v in names]


# --------------------------------------------------------------------------
# the machine's Debian mirror
# --------------------------------------------------------------------------

def _deb822_stanzas(text):
    stanza = {}
    key = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
            continue
        if line[0] in " \t" and key:
            stanza[key] += " " + line.strip()
            continue
        key, _, value = line.partition(":")
        key = key.strip().lower()
        stanza[key] = value.strip()
    if stanza:
        yield stanza


def apt_sources(etc="/etc/apt"):
    """(uri, suite, components) of every enabled 'deb' source of the machine."""
    out = []
    for path in sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.sources"))):
        try:
            text = open(path).read()
        except OSError:
            continue
        for st in _deb822_stanzas(text):
            if "deb" not in st.get("types", "").split() or st.get("enabled", "yes") == "no":
                continue
            for uri in st.get("uris", "").split():
                for suite in st.get("suites", "").split():
                    out.append((uri, suite, st.get("components", "").split()))
    lists = [os.path.join(etc, "sources.list")]
    lists += sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.list")))
    for path in lists:
        try:
            lines = open(path).read().splitlines()
        except OSError:
            continue
        for line in lines:
            line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(line) >= 3 and line[0] == "deb":
                out.append((line[1], line[2], line[3:]))
    return out


def debian_mirror(etc="/etc/apt"):
    """The machine's main Debian archive URI (not -security, not a third-party repo)."""
    for uri, suite, _ in apt_sources(etc):
        if suite.endswith("-security") or "security" in uri:
            continue
        if re.search(r"/debian/?$", uri):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


# --------------------------------------------------------------------------
# fetching
# --------------------------------------------------------------------------

def _apt_opts(vdir):
    return ["-o", "Dir::Etc::SourceList=" + os.path.join(vdir, "sources.list"),
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", "Dir::Etc::Preferences=/dev/null",
            "-o", "Dir::Etc::PreferencesParts=/dev/null",
            "-o", "Dir::State::Lists=" + os.path.join(vdir, "apt", "lists"),
            "-o", "Dir::Cache=" + os.path.join(vdir, "apt", "cache"),
            "-o", "APT::Sandbox::User=root",
            "-o", "Acquire::Languages=none",
            "-o", "APT::Default-Release="]


def _apt(vdir, *args, cwd=None, log=None):
    argv = ["apt-get", "-q"] + _apt_opts(vdir) + list(args)
    if log:
        log("%s: %s" % (os.path.basename(vdir), " ".join(args)))
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=APT_TIMEOUT,
                            env=dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive"))
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DockerUnavailable("apt-get %s failed: %s" % (args[0], e)) from e
    said = cp.stdout + cp.stderr
    if cp.returncode != 0 or "Failed to fetch" in said or re.search(r"^E: ", said, re.M):
        raise DockerUnavailable("apt-get %s failed (rc %s): %s" % (
            " ".join(args), cp.returncode, said.strip()[-1500:]))
    return cp


def _fetch(version, vdir, log=None):
    suite = VERSIONS[version][0]
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise DockerUnavailable("apt-get / dpkg-deb not available to fetch Docker %s" % version)
    if os.geteuid() != 0:
        raise DockerUnavailable("fetching Docker %s needs root (apt-get)" % version)
    for d in ("apt/lists/partial", "apt/cache/archives/partial", "debs"):
        os.makedirs(os.path.join(vdir, d), exist_ok=True)
    signed = " [signed-by=%s]" % KEYRING if os.path.exists(KEYRING) else ""
    with open(os.path.join(vdir, "sources.list"), "w") as f:
        f.write("deb%s %s %s main\n" % (signed, debian_mirror(), suite))
    _apt(vdir, "update", log=log)
    debs = os.path.join(vdir, "debs")
    for old in glob.glob(os.path.join(debs, "*.deb")):
        os.unlink(old)
    _apt(vdir, "download", *PACKAGES, cwd=debs, log=log)
    tmp = os.path.join(vdir, "root.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    packages = {}
    for deb in sorted(glob.glob(os.path.join(debs, "*.deb"))):
        cp = subprocess.run(["dpkg-deb", "-x", deb, tmp], capture_output=True, text=True)
        if cp.returncode != 0:
            raise DockerUnavailable("dpkg-deb -x %s: %s" % (deb, cp.stderr.strip()))
        name, ver = subprocess.run(["dpkg-deb", "-f", deb, "Package", "Version"],
                                   capture_output=True, text=True).stdout.split("\n")[:2]
        packages[name.split(":", 1)[1].strip()] = ver.split(":", 1)[1].strip()
    # never let a fetched runc shadow bookworm's (it needs a newer glibc)
    for runc in glob.glob(os.path.join(tmp, "usr", "*bin", "runc")):
        os.unlink(runc)
    root = os.path.join(vdir, "root")
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)
    with open(os.path.join(vdir, "packages"), "w") as f:
        f.write("".join("%s %s\n" % kv for kv in sorted(packages.items())))
    # the package lists (sid's are large) and .debs are not needed any more
    shutil.rmtree(os.path.join(vdir, "apt"), ignore_errors=True)
    shutil.rmtree(debs, ignore_errors=True)
    return packages


def _read_packages(vdir):
    try:
        with open(os.path.join(vdir, "packages")) as f:
            return dict(line.split(None, 1) for line in f.read().split("\n") if line.strip())
    except (OSError, ValueError):
        return None


def _from_tree(version, vdir, packages):
    root = os.path.join(vdir, "root")
    bins = [os.path.join(root, d) for d in ("usr/sbin", "usr/bin", "sbin", "bin")
            if os.path.isdir(os.path.join(root, d))]
    inst = DockerInstall(
        version=version,
        dockerd=os.path.join(root, "usr", "sbin", "dockerd"),
        docker=os.path.join(root, "usr", "bin", "docker"),
        containerd=os.path.join(root, "usr", "bin", "containerd"),
        api_version=VERSIONS[version][1],
        daemon_path=":".join(bins + [SYSTEM_PATH]),
        root=root,
        packages=packages)
    missing = [p for p in (inst.dockerd, inst.docker, inst.containerd) if not os.access(p, os.X_OK)]
    if missing:
        raise DockerUnavailable("Docker %s: %s missing in %s" % (version, ", ".join(missing), root))
    return inst


_CACHE = {}


def docker_install(version=DEFAULT_VERSION, fetch=True, log=None):
    """The DockerInstall of `version`, fetching it first if needed and `fetch`.

    Raises DockerUnavailable (with the reason) when it cannot be had here; the reason
    is remembered for the rest of the process, so a failing fetch is tried only once."""
    version = str(version)
    if version not in VERSIONS:
        raise ValueError("unknown Docker version %r (known: %s)" % (version, ", ".join(VERSIONS)))
    hit = _CACHE.get(version)
    if isinstance(hit, DockerInstall):
        return hit
    if isinstance(hit, DockerUnavailable):
        raise hit
    try:
        inst = _docker_install(version, fetch, log)
    except DockerUnavailable as e:
        if fetch:
            _CACHE[version] = e
        raise
    _CACHE[version] = inst
    return inst


def _docker_install(version, fetch, log):
    if VERSIONS[version][0] is None:
        inst = DockerInstall(version=version, dockerd="/usr/sbin/dockerd", docker="/usr/bin/docker",
                             containerd="/usr/bin/containerd", api_version=VERSIONS[version][1],
                             daemon_path=SYSTEM_PATH)
        missing = [p for p in (inst.dockerd, inst.docker, inst.containerd)
                   if not os.access(p, os.X_OK)]
        if missing:
            raise DockerUnavailable("Docker %s: missing executable %s" % (version, ", ".join(missing)))
        return inst
    vdir = os.path.join(cache_dir(), version)
    packages = _read_packages(vdir)
    if packages is not None:
        return _from_tree(version, vdir, packages)
    if not fetch:
        raise DockerUnavailable("Docker %s not fetched yet (python -m tests.lab.docker_versions fetch %s)"
                                % (version, version))
    try:
        os.makedirs(vdir, exist_ok=True)
        lockf = open(os.path.join(cache_dir(), ".%s.lock" % version), "w")
    except OSError as e:
        raise DockerUnavailable("Docker %s: cache %s not writable: %s" % (version, cache_dir(), e)) from e
    with lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)          # another test run may be fetching it
        packages = _read_packages(vdir)
        if packages is None:
            packages = _fetch(version, vdir, log=log)
    return _from_tree(version, vdir, packages)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv else "show"
    if cmd not in ("fetch", "show"):
        sys.stderr.write(__doc__.split("Command line", 1)[1])
        return 2
    versions = selected_versions(",".join(argv)) if argv else selected_versions()
    rc = 0
    for v in versions:
        try:
            inst = docker_install(v, fetch=cmd == "fetch",
                                  log=lambda m: sys.stderr.write(m + "\n"))
        except DockerUnavailable as e:
            print("%-6s unavailable: %s" % (v, e))
            rc = 1
            continue
        print("%-6s dockerd %s  (%s; PATH=%s)" % (v, inst.full_version, inst.dockerd, inst.daemon_path))
    return rc


if __name__ == "__main__":
    sys.exit(main())
