"""The [nuage] config section, the seed plugin's keys as aliases, config/nuage.cfg."""
import os

import pytest

from netplugin.config import config_from_text, load_config
from netplugin.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEED_KEYS = '''
VrsEndpoint = "localhost"
VrsPort = 6633
VrsBridge = "alubr0"
DockerEndpoint = "unix:///var/run/docker.sock"
LogLevel = "Info"
'''


def test_defaults():
    cfg = config_from_text('backend = "nuage"')
    n = cfg.nuage
    assert (n.vrs_endpoint, n.vrs_port, n.vrs_bridge, n.docker_endpoint) == \
        ("localhost", 6633, "alubr0", "unix:///var/run/docker.sock")
    assert (n.resolve_timeout, n.vrs_timeout, n.docker_timeout) == (10.0, 5.0, 3.0)
    assert n.hostname                   # $HOSTNAME or the machine's name
    assert cfg.socket == "/run/docker/plugins/nuage.sock" and cfg.driver_name == "nuage"


def test_nuage_section():
    cfg = config_from_text('''
backend = "nuage"
[nuage]
vrs_endpoint = "unix:/var/run/openvswitch/db.sock"
vrs_bridge = "br-nuage"
docker_endpoint = "tcp://127.0.0.1:2375"
resolve_timeout = 30
vrs_timeout = 2.5
docker_timeout = 1
hostname = "node1"
''')
    n = cfg.nuage
    assert n.vrs_endpoint == "unix:/var/run/openvswitch/db.sock"
    assert (n.vrs_bridge, n.docker_endpoint) == ("br-nuage", "tcp://127.0.0.1:2375")
    assert (n.resolve_timeout, n.vrs_timeout, n.docker_timeout) == (30.0, 2.5, 1.0)
    assert n.hostname == "node1"


def test_seed_keys_are_aliases_and_select_nuage():
    cfg = config_from_text(SEED_KEYS + 'Scope = "local"\n')
    assert cfg.backend == "nuage" and cfg.scope == "local" and cfg.log_level == "info"
    assert (cfg.nuage.vrs_endpoint, cfg.nuage.vrs_port, cfg.nuage.vrs_bridge,
            cfg.nuage.docker_endpoint) == ("localhost", 6633, "alubr0",
                                           "unix:///var/run/docker.sock")


def test_seed_keys_mix_with_nuage_section():
    cfg = config_from_text(SEED_KEYS + '[nuage]\nresolve_timeout = 2.0\n')
    assert cfg.nuage.vrs_port == 6633 and cfg.nuage.resolve_timeout == 2.0


def test_seed_key_and_nuage_key_together_is_an_error():
    with pytest.raises(ConfigError, match="'VrsPort' and 'nuage.vrs_port' are both set"):
        config_from_text('VrsPort = 6633\n[nuage]\nvrs_port = 6640\n')


def test_example_config_file_loads():
    cfg = load_config(os.path.join(ROOT, "config", "nuage.cfg"))
    assert cfg.backend == "nuage" and cfg.scope == "global"
    assert cfg.datastore.type == "etcd"
    assert (cfg.nuage.vrs_endpoint, cfg.nuage.vrs_port, cfg.nuage.vrs_bridge) == \
        ("localhost", 6633, "alubr0")


def test_the_seed_file_verbatim_loads():
    cfg = config_from_text(SEED_KEYS + 'Scope = "global"\n')
    assert cfg.backend == "nuage" and cfg.scope == "global"
    # Loads, with a start-up warning: an embedded store is this host's only.
    assert any("this host only" in w for w in cfg.warnings)


@pytest.mark.parametrize("text, words", [
    ('[nuage]\nvrs_port = 0', ["'nuage.vrs_port'", "TCP port"]),
    ('[nuage]\nvrs_port = "6633"', ["'nuage.vrs_port'", "integer"]),
    ('VrsPort = 70000', ["'nuage.vrs_port'", "70000"]),
    ('[nuage]\nvrs_endpoint = "unix:db.sock"', ["'nuage.vrs_endpoint'", "absolute"]),
    ('[nuage]\nvrs_endpoint = ""', ["'nuage.vrs_endpoint'", "host name"]),
    ('[nuage]\nvrs_endpoint = "tcp://h:1"', ["'nuage.vrs_endpoint'", "tcp://h:1"]),
    ('[nuage]\nvrs_bridge = ""', ["'nuage.vrs_bridge'", "empty"]),
    ('[nuage]\ndocker_endpoint = "/var/run/docker.sock"', ["'nuage.docker_endpoint'"]),
    ('[nuage]\nresolve_timeout = 0', ["'nuage.resolve_timeout'", "0"]),
    ('[nuage]\nvrs_timeout = -1', ["'nuage.vrs_timeout'"]),
    ('[nuage]\ndocker_timeout = 1000', ["'nuage.docker_timeout'", "1000"]),
    ('[nuage]\ncolour = "blue"', ["'nuage.colour'", "unknown"]),
    ('nuage = 3', ["'nuage'", "table"]),
])
def test_bad_nuage_values(text, words):
    with pytest.raises(ConfigError) as exc:
        config_from_text('backend = "nuage"\n' + text if not text.startswith("Vrs")
                         else text)
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
