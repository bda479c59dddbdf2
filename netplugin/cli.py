"""``netplugin -f FILE``: load the config and serve Docker on the unix socket.

The Docker protocol app is served by gunicorn (like the Calico plugin) in the
foreground; SIGTERM/SIGINT stop it cleanly and gunicorn removes the socket.
Each worker process builds its own datastore connection and backend.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import List, Optional

from netplugin import __version__
from netplugin.config import Config, describe, load_config
from netplugin.errors import ConfigError, PluginError

log = logging.getLogger("netplugin")

LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def build_backend(cfg: Config):
    """Datastore adapter (wrapped to count operations) + the configured backend."""
    from netplugin.backend import load_backend
    from netplugin.datastore import CountingDatastore, open_datastore

    store = CountingDatastore(open_datastore(cfg.datastore))
    return load_backend(cfg.backend)(cfg, store)


def build_app(cfg: Config):
    """Backend started and wrapped in the Flask app (one per worker process)."""
    from netplugin.app import create_app

    backend = build_backend(cfg)
    try:
        backend.datastore.ping()
    except Exception as exc:  # the plugin still starts: calls answer a clear Err
        log.warning("datastore not reachable at start-up: %s", exc)
    backend.start()
    app = create_app(backend, cfg.scope)
    app.config["NETPLUGIN_BACKEND"] = backend
    return app


def prepare_socket(path: str) -> None:
    """Make the socket directory; refuse to steal a socket someone serves on;
    remove a stale one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.lexists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError, socket.timeout, OSError):
        os.unlink(path)  # nobody answers: a leftover of a killed plugin
        return
    finally:
        probe.close()
    raise ConfigError(f"{path}: another process is already serving on this socket")


def serve(cfg: Config) -> None:
    from gunicorn.app.base import BaseApplication

    from netplugin import agent
    from netplugin.backend import load_backend

    agent_proc = None
    if load_backend(cfg.backend).has_agent:
        agent_proc = agent.spawn(os.path.abspath(cfg.path))

    def on_exit(_server):
        agent.stop(agent_proc)

    class PluginApplication(BaseApplication):
        def load_config(self):
            settings = {
                "bind": [f"unix:{cfg.socket}"],
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

    prepare_socket(cfg.socket)
    log.info("netplugin %s serving %s on %s", __version__, describe(cfg), cfg.socket)
    try:
        PluginApplication().run()
    finally:
        agent.stop(agent_proc)


def _worker_exit(_server, worker) -> None:
    app = getattr(worker, "wsgi", None)
    backend = getattr(app, "config", {}).get("NETPLUGIN_BACKEND") if app else None
    if backend is not None:
        backend.stop()
        backend.datastore.close()


def default_config_path() -> str:
    return os.environ.get("NETPLUGIN_CONFIG") or "plugin.cfg"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="netplugin",
        description="Docker libnetwork remote network/IPAM driver (Calico, Nuage backends).")
    ap.add_argument("-f", "--config", default=None,
                    help="TOML config file (default: $NETPLUGIN_CONFIG, else ./plugin.cfg)")
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
    except PluginError as exc:  # --audit against an unreachable datastore/dockerd
        print(f"netplugin: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
