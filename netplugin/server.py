"""The plugin in one process (``workers = 1``, the default): waitress + the agent as a thread.
Owns: serving the app on the listening socket and the signals; not building it (runtime).

Waitress serves the Docker protocol app on the already listening unix socket
with ``threads`` threads, and the backend's host agent runs as a thread beside
it (instead of a gunicorn master, a worker and an agent process: a third of
the memory).  SIGTERM/SIGINT stop both and remove the socket; SIGHUP re-reads
``log_level`` from the config file."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Callable

from netplugin.config import Config
from netplugin.runtime import close_backend, reread_log_level

log = logging.getLogger("netplugin.server")

#: waitress buffers a request before the app sees it (in memory up to 512
#: KiB, beyond that in a temporary file) and answers a body larger than this
#: a plain HTTP 413 itself without reading it.  Up to this size the app
#: answers the 413 (over ``app.MAX_BODY``, 1 MiB) as JSON ``Err`` with a log
#: line, which is what Docker and the operator read.
MAX_SPOOLED_BODY = 32 * 1024 * 1024


def serve_in_process(cfg: Config, listener: socket.socket, build_app: Callable,
                     has_agent: bool) -> None:
    from waitress.server import create_server

    from netplugin import agent, sdnotify

    stop = threading.Event()
    app = build_app(cfg)
    server = create_server(app, sockets=[listener], threads=cfg.threads,
                           max_request_body_size=MAX_SPOOLED_BODY, ident="netplugin",
                           channel_timeout=300, connection_limit=256)
    sdnotify.notify_when_answering(cfg.socket)
    agent_thread = None
    if has_agent:
        agent_thread = threading.Thread(target=agent.run, args=(cfg, stop), name="agent",
                                        daemon=True)
        agent_thread.start()

    def shutdown(signum, _frame):
        log.info("signal %d: stopping", signum)
        stop.set()
        server.close()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGHUP, lambda *_: reread_log_level(cfg))
    try:
        server.run()
    except (OSError, ValueError):   # closed under its feet by shutdown()
        if not stop.is_set():
            raise
    finally:
        stop.set()
        backend = app.config.get("NETPLUGIN_BACKEND")
        if backend is not None:
            close_backend(backend)
        if agent_thread is not None:
            agent_thread.join(15)
        try:
            os.unlink(cfg.socket)
        except OSError:
            pass
        log.info("stopped")
