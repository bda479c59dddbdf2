"""The plugin socket: 0660 root:group, pre-bound, refused in a directory
others may write to."""
import grp
import os
import socket
import stat

import pytest

from netplugin import listener
from netplugin.config import parse_config
from netplugin.errors import ConfigError


def test_socket_is_0660_root_and_group(tmp_path):
    path = str(tmp_path / "p.sock")
    os.chmod(tmp_path, 0o755)
    sock = listener.open_listener(path, gid=os.getegid())
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_uid == os.geteuid() and st.st_gid == os.getegid()
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)      # listening already
        c.close()
    finally:
        sock.close()


def test_default_group_is_docker_when_it_exists():
    try:
        want = grp.getgrnam("docker").gr_gid
    except KeyError:
        want = 0
    assert listener.socket_gid("") == want
    assert listener.socket_gid("0") == 0


def test_unknown_group_is_a_clear_error():
    with pytest.raises(ConfigError, match="not a group"):
        listener.socket_gid("no-such-group-xyz")
    with pytest.raises(ConfigError, match="socket_group.*names no group"):
        parse_config({"socket_group": "no-such-group-xyz"}, "t.cfg")


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o757])
def test_directory_writable_by_others_is_refused(tmp_path, mode):
    d = tmp_path / "plugins"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(ConfigError, match="writable by others"):
        listener.open_listener(str(d / "p.sock"))
    assert not os.path.exists(d / "p.sock")


def test_a_live_socket_is_not_stolen_a_stale_one_replaced(tmp_path):
    os.chmod(tmp_path, 0o755)
    path = str(tmp_path / "p.sock")
    first = listener.open_listener(path, gid=0)
    with pytest.raises(ConfigError, match="already serving"):
        listener.open_listener(path, gid=0)
    first.close()                      # stale now: nobody answers
    second = listener.open_listener(path, gid=0)
    second.close()


def test_a_file_in_the_way_is_not_removed(tmp_path):
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "p.sock"
    path.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        listener.open_listener(str(path), gid=0)
    assert path.read_text() == "x"
