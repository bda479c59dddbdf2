"""Config loading: the key contract, defaults, aliases and one-line errors."""
import os
import subprocess
import sys

import pytest

from netplugin.config import config_from_text, load_config
from netplugin.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_issue_example_loads():
    cfg = config_from_text('''
scope = "local"
backend = "calico"
socket = "/run/docker/plugins/calico.sock"
log_level = "info"
[datastore]
type = "embedded"
path = "/var/lib/netplugin/state.db"
[calico]
hostname = "host-a"
''')
    assert cfg.scope == "local" and cfg.backend == "calico"
    assert cfg.driver_name == "calico"
    assert cfg.datastore.type == "embedded"
    assert cfg.calico.hostname == "host-a" and cfg.calico.mtu == 1500


def test_defaults():
    cfg = config_from_text("")
    assert cfg.backend == "calico"
    assert cfg.socket == "/run/docker/plugins/calico.sock"
    assert cfg.datastore.type == "embedded"
    assert cfg.calico.hostname  # $HOSTNAME or the machine's name


def test_socket_basename_is_driver_name():
    cfg = config_from_text('socket = "/run/docker/plugins/mycalico.sock"')
    assert cfg.driver_name == "mycalico"


def test_etcd_authority_env(monkeypatch):
    monkeypatch.delenv("ETCD_ENDPOINTS", raising=False)
    monkeypatch.setenv("ETCD_AUTHORITY", "10.0.0.1:4001")
    cfg = config_from_text('[datastore]\ntype = "etcd"')
    assert cfg.datastore.endpoints == ["http://10.0.0.1:4001"]
    cfg = config_from_text('[datastore]\ntype = "etcd"\nendpoints = ["http://h:2379"]')
    assert cfg.datastore.endpoints == ["http://h:2379"]


def test_hostname_env(monkeypatch):
    monkeypatch.setenv("HOSTNAME", "from-env")
    assert config_from_text("").calico.hostname == "from-env"


def test_seed_nuage_keys_are_aliases():
    cfg = config_from_text('''
VrsEndpoint = "localhost"
VrsPort = 6633
VrsBridge = "alubr0"
DockerEndpoint = "unix:///var/run/docker.sock"
LogLevel = "Info"
Scope = "local"
''')
    # No backend key: the seed file means the Nuage backend (if installed).
    assert cfg.nuage.vrs_endpoint == "localhost" and cfg.nuage.vrs_port == 6633
    assert cfg.log_level == "info" and cfg.scope == "local"


@pytest.mark.parametrize("text, words", [
    ('scope = "planet"', ["'scope'", "'planet'", "local"]),
    ('backend = "weave"', ["'backend'", "'weave'"]),
    ('[datastore]\ntype = "redis"', ["'datastore.type'", "'redis'"]),
    ('log_level = 3', ["'log_level'", "string", "3"]),
    ('[calico]\nmtu = "big"', ["'calico.mtu'", "integer", "big"]),
    ('[calico]\nmtu = 20', ["'calico.mtu'", "20"]),
    ('socket = "relative.sock"', ["'socket'", "absolute"]),
    ('colour = "blue"', ["'colour'", "unknown"]),
    ('[datastore]\nendpoints = "http://x"', ["'datastore.endpoints'", "list"]),
    ('datastore = 5', ["'datastore'", "table"]),
])
def test_bad_values_name_key_and_value(text, words):
    with pytest.raises(ConfigError) as exc:
        config_from_text(text, "my.cfg")
    msg = str(exc.value)
    assert msg.startswith("my.cfg: ") and "\n" not in msg
    for w in words:
        assert w in msg


def test_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.cfg"
    path.write_text('scope = "local"\nbackend = \n')
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    assert str(path) in str(exc.value) and "line 2" in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(str(tmp_path / "nope.cfg"))
    assert "not found" in str(exc.value)


@pytest.mark.parametrize("content, needle", [
    (None, "config file not found"),
    ('scope = "x"\n', "'scope'"),
    ('[calico\n', "line 1"),
])
def test_launcher_exits_with_one_line(tmp_path, content, needle):
    path = tmp_path / "p.cfg"
    if content is not None:
        path.write_text(content)
    r = subprocess.run([os.path.join(ROOT, "plugin"), "-f", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and str(path) in lines[0]
    assert "Traceback" not in r.stderr


def test_check_flag_and_default_config():
    r = subprocess.run([sys.executable, "-m", "netplugin", "--check", "-f",
                        os.path.join(ROOT, "plugin.cfg")],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "backend=calico" in r.stdout


def test_example_configs_are_valid():
    cfgdir = os.path.join(ROOT, "config")
    names = [n for n in os.listdir(cfgdir) if n.endswith(".cfg")]
    assert names
    for name in names:
        load_config(os.path.join(cfgdir, name))


def test_global_scope_with_embedded_store_warns():
    cfg = config_from_text('scope = "global"', "g.cfg")
    assert cfg.scope == "global"
    assert any("embedded" in w and "this host only" in w for w in cfg.warnings)
    assert config_from_text('scope = "global"\n[datastore]\ntype = "etcd"').warnings == []


def test_calico_audit_interval_and_grace():
    cfg = config_from_text("[datastore]\ntimeout = 3\n")
    assert cfg.calico.audit_interval == 60.0
    assert cfg.calico.audit_grace == 3 + 5.0        # the datastore timeout + a margin
    cfg = config_from_text("[calico]\naudit_interval = 2\naudit_grace = 12.5\n")
    assert cfg.calico.audit_interval == 2.0 and cfg.calico.audit_grace == 12.5
    assert not cfg.warnings
    cfg = config_from_text("[datastore]\ntimeout = 5\n[calico]\naudit_grace = 1\n")
    assert any("audit_grace" in w for w in cfg.warnings)
    for text, key in (("audit_interval = 0", "audit_interval"),
                      ("audit_grace = -1", "audit_grace"),
                      ('audit_interval = "often"', "audit_interval")):
        with pytest.raises(ConfigError) as exc:
            config_from_text(f"[calico]\n{text}\n", "x.toml")
        assert f"calico.{key}" in str(exc.value) or key in str(exc.value)


def test_etcdv3_example_config_loads():
    cfg = load_config(os.path.join(ROOT, "config", "calico-etcd3.cfg"))
    d = cfg.datastore
    assert d.type == "etcdv3" and len(d.endpoints) == 3 and d.timeout == 5.0
    assert (d.ca_file, d.cert_file, d.key_file) == (
        "/etc/netplugin/etcd-ca.pem", "/etc/netplugin/etcd-client.pem",
        "/etc/netplugin/etcd-client-key.pem")
    assert (d.username, d.password) == ("netplugin", "change-me")


@pytest.mark.parametrize("text, message", [
    ('type = "etcdv3"\ncert_file = "/c.pem"\n',
     "key 'datastore.key_file' must be set together with 'datastore.cert_file'"),
    ('type = "etcdv3"\nusername = "u"\n',
     "key 'datastore.password' must be set together with 'datastore.username'"),
    ('type = "etcdv3"\nca_file = "ca.pem"\n', "key 'datastore.ca_file' must be an absolute path"),
    ('type = "consul"\nca_file = "/ca.pem"\n',
     "key 'datastore.ca_file' applies to the etcd and etcdv3 types only"),
])
def test_datastore_tls_and_auth_errors(text, message):
    with pytest.raises(ConfigError) as exc:
        config_from_text("[datastore]\n" + text)
    assert message in str(exc.value)
