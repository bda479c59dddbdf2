"""The launcher: ``netplugin -f FILE`` (and --check, --audit, --agent), run by ./plugin.
Owns: arguments, socket/state preparation, gunicorn or the one-process server; not the wiring.

The Docker protocol app is served by gunicorn (like the Calico plugin) in the
foreground; SIGTERM/SIGINT stop it cleanly and gunicorn removes the socket.
Each worker process builds its own datastore connection and backend
(``netplugin.runtime``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from netplugin import __version__
from netplugin.config import Config, describe, load_config
from netplugin.errors import ConfigError, PluginError
from netplugin.runtime import build_app, build_backend, close_backend, reread_log_level

log = logging.getLogger("netplugin")

LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def check_datastore(cfg: Config) -> None:
    """Before serving: a datastore misconfiguration that waiting cannot heal
    (certificate files, TLS verification, credentials) raises (one line:
    type, endpoint, cause; the plugin refuses to start).  An unreachable
    datastore is one warning line: the plugin starts and answers clear Errs
    until it is back."""
    from netplugin.datastore import DatastoreMisconfigured, open_datastore

    store = open_datastore(cfg.datastore)
    try:
        store.ping()
    except DatastoreMisconfigured:
        raise
    except Exception as exc:  # the plugin still starts: calls answer a clear Err
        log.warning("datastore not reachable at start-up: %s", exc)
    finally:
        store.close()


def prepare_socket(path: str, attempts: int = 3, pause: float = 0.5) -> None:
    """Make the socket directory; refuse to steal a socket someone serves on;
    remove a stale one (see ``netplugin.listener.clear_path``)."""
    from netplugin import listener

    os.makedirs(os.path.dirname(path), exist_ok=True)
    listener.clear_path(path, attempts, pause)


def prepare_state(cfg: Config) -> None:
    """The plugin's host-local state dir: a fresh multiprocess metrics
    directory (before any process imports prometheus_client) and the log
    level of the config."""
    import shutil

    from netplugin import runstate

    os.makedirs(cfg.driver_state_dir, mode=0o700, exist_ok=True)
    metrics_dir = os.path.join(cfg.driver_state_dir, "metrics")
    shutil.rmtree(metrics_dir, ignore_errors=True)
    os.makedirs(metrics_dir, mode=0o700)
    if "prometheus_client" in sys.modules:  # pragma: no cover - a launcher bug
        log.warning("prometheus_client imported before its multiprocess directory was set")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    runstate.set_log_level(cfg.driver_state_dir, cfg.log_level)


def serve(cfg: Config) -> None:
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    from netplugin import agent, runstate, sdnotify, server
    from netplugin.backend import load_backend
    from netplugin.listener import open_listener

    prepare_state(cfg)   # before anything imports prometheus_client (the datastore does)
    check_datastore(cfg)
    runstate.watch_log_level(cfg.driver_state_dir)
    # Bound (0660, root:socket_group) and listening before anything can be
    # accepted, in both modes: waitress serves it, gunicorn gets its fd.
    listener = open_listener(cfg.socket, cfg.socket_group)
    if cfg.workers == 1:
        log.info("netplugin %s serving %s on %s (one process)", __version__, describe(cfg),
                 cfg.socket)
        server.serve_in_process(cfg, listener, build_app, load_backend(cfg.backend).has_agent)
        return

    agent_proc = None
    if load_backend(cfg.backend).has_agent:
        agent_proc = agent.spawn(os.path.abspath(cfg.path))

    def on_exit(_server):
        agent.stop(agent_proc)

    class PluginArbiter(Arbiter):
        def handle_hup(self):
            reread_log_level(cfg)

    class PluginApplication(BaseApplication):
        def run(self):
            PluginArbiter(self).run()

        def load_config(self):
            settings = {
                "bind": [f"fd://{listen_fd}"],
                "workers": cfg.workers,
                "threads": cfg.threads,
                "worker_class": "gthread" if cfg.threads > 1 else "sync",
                # Docker sets no timeout on plugin calls; a worker silent this
                # long is wedged and gets replaced.
                "timeout": 300,
                "graceful_timeout": 20,
                "loglevel": cfg.log_level,
                "accesslog": None,
                "errorlog": "-",
                "proc_name": f"netplugin-{cfg.driver_name}",
                "worker_exit": _worker_exit,
                "child_exit": _child_exit,
                "when_ready": lambda _arbiter: sdnotify.notify_when_answering(cfg.socket),
                "post_fork": _die_with_master,
                "on_exit": on_exit,
                # gunicorn >= 25 opens a control socket at one fixed path per
                # user: several plugins on a machine would fight over it.
                "control_socket_disable": True,
            }
            for key, value in settings.items():
                if key in self.cfg.settings:  # older gunicorn lacks some settings
                    self.cfg.set(key, value)

        def load(self):
            return build_app(cfg)

    listen_fd = listener.detach()   # gunicorn's now (it closes it on exit)
    log.info("netplugin %s serving %s on %s", __version__, describe(cfg), cfg.socket)
    try:
        PluginApplication().run()
    finally:
        agent.stop(agent_proc)


def _child_exit(_server, worker) -> None:
    from netplugin import metrics
    metrics.process_dead(worker.pid)
PR_SET_PDEATHSIG = 1


def _die_with_master(server, _worker) -> None:
    """gunicorn post_fork hook: the worker gets SIGKILL when its master dies
    (kill -9 of ./plugin), so it never goes on answering on a socket a
    restarted plugin wants; a master already gone makes it exit at once."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != server.pid:
        os._exit(1)


def _worker_exit(_server, worker) -> None:
    app = getattr(worker, "wsgi", None)
    backend = getattr(app, "config", {}).get("NETPLUGIN_BACKEND") if app else None
    if backend is not None:
        close_backend(backend)


def default_config_path() -> str:
    return os.environ.get("NETPLUGIN_CONFIG") or "plugin.cfg"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="netplugin",
        description="Docker libnetwork remote network/IPAM driver (Calico, Nuage backends).")
    ap.add_argument("-f", "--config", default=None,
                    help="TOML config file (default: $NETPLUGIN_CONFIG, else ./plugin.cfg)")
    ap.add_argument("--socket", metavar="PATH", default=None,
                    help="serve on this socket instead of the config's `socket` (the "
                         "managed plugin uses /run/docker/plugins/netplugin.sock)")
    ap.add_argument("--check", action="store_true",
                    help="validate the config file, print a summary and exit")
    ap.add_argument("--audit", action="store_true",
                    help="remove endpoints, devices and addresses Docker no longer knows "
                         "(leaked by crashes or dockerd restarts), print what was done, exit")
    ap.add_argument("--dry-run", action="store_true",
                    help="with --audit: only report what would be removed")
    ap.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--version", action="version", version=f"netplugin {__version__}")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    path = args.config or default_config_path()
    try:
        cfg = load_config(path)
        if args.socket:
            if not args.socket.startswith("/") or args.socket.endswith("/"):
                raise ConfigError(f"--socket must be an absolute path to a socket file, "
                                  f"got {args.socket!r}")
            cfg.socket = args.socket
        logging.basicConfig(level=cfg.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
        for warning in cfg.warnings:
            log.warning("%s", warning)
        if args.check:
            print(f"{path}: ok ({describe(cfg)})")
            return 0
        if args.audit:
            import json
            backend = build_backend(cfg)
            try:
                print(json.dumps(backend.audit(dry_run=args.dry_run), indent=2, sort_keys=True))
            finally:
                backend.datastore.close()
            return 0
        if args.agent:  # the per-host agent process (see netplugin.agent)
            from netplugin import agent
            return agent.run(cfg)
        serve(cfg)
    except ConfigError as exc:
        print(f"netplugin: error: {exc}", file=sys.stderr)
        return 2
    except PluginError as exc:  # a misconfigured datastore; --audit against an unreachable one
        print(f"netplugin: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
