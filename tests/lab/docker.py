"""dockerd inside a lab host: start/stop/restart (with its own containerd), the CLI and
SDK client that talk to it, and the busybox image every dockerd gets.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from .base import (BUSYBOX, IMAGE, IMAGE_ALIASES, LabCommandError, LabError, _env, _kill,
                   _pid_alive, _run, _tail)
from .docker_versions import DEFAULT_VERSION, DockerUnavailable, docker_install

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


class DockerdMixin:
    """Host methods for the host's dockerd (Host sets _dockerd, _dockerd_args, sock...).

    ``docker_version`` (a key of docker_versions.VERSIONS, default 20.10) picks the
    dockerd, its containerd and the CLI; ``docker_install`` is its DockerInstall."""

    docker_version = DEFAULT_VERSION

    @property
    def docker_install(self):
        try:
            return docker_install(self.docker_version)
        except DockerUnavailable as e:
            raise LabError(str(e)) from e

    @property
    def dockerd_running(self):
        return self._dockerd is not None and self._dockerd.poll() is None

    @property
    def dockerd_pid(self):
        return self._dockerd.pid if self.dockerd_running else None

    def start_dockerd(self, extra_args=(), timeout=60, version=None):
        """Start dockerd (Docker `version`, default: the host's docker_version) inside
        the host and wait until its API answers; make sure bb:latest (alias
        busybox:latest) is loaded.  dockerd starts its own containerd (state in
        <exec-root>/containerd) from the same version's tree."""
        if self.dockerd_running:
            raise LabError("dockerd already running on %s" % self.name)
        if version is not None:
            self.docker_version = str(version)
        inst = self.docker_install
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
            inst.dockerd, "--config-file", cfg,
            "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--bridge=none",
            "--storage-driver=vfs", "--data-root", self.data_root,
            "--exec-root", self.exec_root, "--pidfile", os.path.join(self.dir, "docker.pid"),
            "-H", self.docker_host, "--cgroup-parent", self.cgroup_parent,
            "--userland-proxy=false", "--shutdown-timeout=2",
        ] + list(extra_args))
        # the version's own bin dirs first (containerd, shims, docker-proxy,
        # docker-init), then the system's: runc stays bookworm's /usr/sbin/runc.
        # Swarm tasks use the local image instead of asking a registry (none here).
        env = _env({"PATH": inst.daemon_path, "HOME": self.dir,
                    "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"})
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
        """Run the docker CLI of the host's Docker version against its dockerd
        (from the root ns: it only needs the unix socket)."""
        env = _env({"DOCKER_CONFIG": self.lab.cli_config_dir})
        try:
            return _run([self.docker_install.docker, "-H", self.docker_host] + list(args),
                        check=check, timeout=timeout, input=input, stdin=stdin, env=env,
                        text=stdin is None and not isinstance(input, bytes))
        except LabCommandError as e:
            if "Cannot connect to the Docker daemon" not in str(e):
                raise
            p = self._dockerd
            state = "not started" if p is None else (
                "running" if p.poll() is None else f"exited ({p.returncode})")
            raise LabError("%s\ndockerd on %s: %s; log tail:\n%s" % (
                e, self.name, state, _tail(self.dockerd_log))) from None

    def client(self, timeout=120):
        """docker SDK client for this host's dockerd (closed at lab close)."""
        import docker  # noqa: PLC0415 - optional dependency, only when used
        c = docker.DockerClient(base_url=self.docker_host, version=self.docker_install.api_version,
                                timeout=timeout)
        self.lab._clients.append(c)
        return c

    def exec_in_container(self, container, *cmd, check=True, timeout=60):
        """docker exec CONTAINER CMD... -> CompletedProcess."""
        return self.docker("exec", container, *cmd, check=check, timeout=timeout)

    def container_pid(self, container):
        """PID (in the machine's pid ns) of a running container's init."""
        return int(self.docker("inspect", "-f", "{{.State.Pid}}", container).stdout.strip())
