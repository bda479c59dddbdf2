"""A restart right after kill -9: gunicorn workers die with their master,
and a socket that still answers for a moment is waited for, not refused."""
import os
import signal
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from netplugin import cli
from netplugin.errors import ConfigError


def test_worker_of_a_dead_master_exits_at_once():
    pid = os.fork()
    if pid == 0:    # the "worker": its master is not its parent
        cli._die_with_master(SimpleNamespace(pid=os.getppid() + 1000000), None)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 1


def test_worker_gets_sigkill_when_its_master_dies():
    r, w = os.pipe()
    master = os.fork()
    if master == 0:
        worker = os.fork()
        if worker == 0:
            cli._die_with_master(SimpleNamespace(pid=os.getppid()), None)
            os.write(w, b"%d\n" % os.getpid())
            time.sleep(30)
            os._exit(0)
        time.sleep(0.5)
        os._exit(0)          # the master dies without cleaning up
    worker_pid = int(os.read(r, 64).split()[0])
    os.waitpid(master, 0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{worker_pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(worker_pid, signal.SIGKILL)
        pytest.fail("the worker outlived its master")


def _serve_for(path, seconds):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def close_later():
        time.sleep(seconds)
        srv.close()
    threading.Thread(target=close_later, daemon=True).start()
    return srv


def test_socket_of_a_dying_plugin_is_waited_for(tmp_path):
    path = str(tmp_path / "calico.sock")
    _serve_for(path, 0.3)
    cli.prepare_socket(path, attempts=5, pause=0.2)
    assert not os.path.lexists(path)


def test_socket_someone_serves_on_is_refused(tmp_path):
    path = str(tmp_path / "calico.sock")
    srv = _serve_for(path, 30)
    try:
        with pytest.raises(ConfigError, match="already serving"):
            cli.prepare_socket(path, attempts=2, pause=0.1)
    finally:
        srv.close()
