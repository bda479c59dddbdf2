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

from .base import (BUSYBOX, CGROUP_NAME, CLONE_NEWNET, DAEMON_PATH, DOCKER, DOCKER_API_VERSION,
                   DOCKERD, ETCD, ETCD_PEER_PORT, ETCD_PORT, HOSTNAME_RE, IMAGE, IMAGE_ALIASES,
                   IP, LABID_RE, NETNS_RE, NSENTER, RESERVED_NAMES, STATE_ROOT, STORE_ADDR,
                   SUBNET_LEN, SUBNET_PREFIX, SYS_PATH, UNSHARE, LabCommandError, LabError,
                   _env, _kill, _pid_alive, _proc_starttime, _read_json, _read_pids, _run,
                   _stop_popen, _tail)
from .cgroups import (_cg_make, _cg_procs, _cg_rmdir, _cg_rmdir_top, _cgroup_mounts,
                      _tracking_cgroup_root)
from .cleanup import (_OPEN_LABS, _close_all_labs, _destroy_lab, _install_safety_net,
                      _signal_handler, _StateLock, sweep_dead_labs)
from .core import Lab, missing_prerequisites
from .docker import DockerdMixin, _busybox_rootfs_tar, _docker_ping
from .docker_versions import (DEFAULT_VERSION, VERSIONS, DockerInstall, DockerUnavailable,
                              docker_install, selected_versions)
from .etcd import EtcdMixin, _http_get
from .hosts import Host
from .netns import (_mountinfo, _netns_delete, _netns_list, _ns_inode, _ns_members, _setns,
                    _umount_under, _under, _unescape_mount, call_in_netns)

# the whole lab at package level, private helpers included (the lab's own tests use them)
__all__ = [
    "BUSYBOX", "CGROUP_NAME", "CLONE_NEWNET", "DAEMON_PATH", "DOCKER", "DOCKERD",
    "DOCKER_API_VERSION", "DockerdMixin", "ETCD", "ETCD_PEER_PORT", "ETCD_PORT", "EtcdMixin",
    "HOSTNAME_RE", "Host", "IMAGE", "IMAGE_ALIASES", "IP", "LABID_RE", "Lab",
    "LabCommandError", "LabError", "NETNS_RE", "NSENTER", "RESERVED_NAMES", "STATE_ROOT",
    "STORE_ADDR", "SUBNET_LEN", "SUBNET_PREFIX", "SYS_PATH", "UNSHARE", "call_in_netns",
    "missing_prerequisites", "sweep_dead_labs",
    "DEFAULT_VERSION", "VERSIONS", "DockerInstall", "DockerUnavailable", "docker_install",
    "selected_versions",
    "_OPEN_LABS", "_StateLock", "_busybox_rootfs_tar", "_cg_make", "_cg_procs", "_cg_rmdir",
    "_cg_rmdir_top", "_cgroup_mounts", "_close_all_labs", "_destroy_lab", "_docker_ping",
    "_env", "_http_get", "_install_safety_net", "_kill", "_mountinfo", "_netns_delete",
    "_netns_list", "_ns_inode", "_ns_members", "_pid_alive", "_proc_starttime", "_read_json",
    "_read_pids", "_run", "_setns", "_signal_handler", "_stop_popen", "_tail",
    "_tracking_cgroup_root", "_umount_under", "_under", "_unescape_mount",
]
