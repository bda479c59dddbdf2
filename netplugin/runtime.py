"""Run-time assembly shared by the launcher (cli), the one-process server and the agent.
Owns: building datastore + backend + app, closing them, SIGHUP's log level; not serving.

``netplugin.cli`` (the launcher), ``netplugin.server`` (one process) and
``netplugin.agent`` (the per-host agent) import this module and never each
other in a circle.
"""
from __future__ import annotations

import logging

from netplugin.config import Config, load_config
from netplugin.errors import ConfigError

log = logging.getLogger("netplugin.server")


def build_backend(cfg: Config):
    """Datastore adapter (wrapped to count operations) + the configured backend."""
    from netplugin.backend import load_backend
    from netplugin.datastore import CountingDatastore, open_datastore

    store = CountingDatastore(open_datastore(cfg.datastore))
    return load_backend(cfg.backend)(cfg, store)


def build_app(cfg: Config):
    """Backend started and wrapped in the Flask app (one per worker process)."""
    from netplugin.app import create_app

    from netplugin import runstate

    runstate.watch_log_level(cfg.driver_state_dir)
    backend = build_backend(cfg)   # check_datastore() looked at the datastore
    backend.start()
    app = create_app(backend, cfg.scope)
    app.config["NETPLUGIN_BACKEND"] = backend
    return app


def close_backend(backend) -> None:
    """Stop a backend built by ``build_backend`` and close its datastore."""
    backend.stop()
    backend.datastore.close()


def reread_log_level(cfg: Config) -> None:
    """SIGHUP: ``log_level`` from the config file, for every process of the
    plugin (through the level file); nothing restarts."""
    from netplugin import runstate

    try:
        level = load_config(cfg.path).log_level
    except ConfigError as exc:
        log.error("SIGHUP: %s; log level unchanged", exc)
        return
    runstate.set_log_level(cfg.driver_state_dir, level)
    log.warning("SIGHUP: log level %s from %s", level, cfg.path)
