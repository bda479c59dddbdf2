"""Load and validate the TOML configuration file.

Every user error raises ``ConfigError`` with one line naming the file, the key
and the value; ``netplugin.cli`` prints it and exits non-zero.  See README.md
("Configuration reference") for every key.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from netplugin.errors import ConfigError

SCOPES = ("local", "global")
DATASTORES = ("embedded", "etcd", "consul")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PLUGIN_DIR = "/run/docker/plugins"

# Top-level keys of the seed Nuage plugin's nuage.cfg, accepted as aliases.
SEED_NUAGE_ALIASES = {
    "VrsEndpoint": "vrs_endpoint",
    "VrsPort": "vrs_port",
    "VrsBridge": "vrs_bridge",
    "DockerEndpoint": "docker_endpoint",
}
SEED_TOP_ALIASES = {"LogLevel": "log_level", "Scope": "scope"}


@dataclass
class DatastoreConfig:
    type: str = "embedded"
    path: str = "/var/lib/netplugin/state.db"          # embedded
    endpoints: List[str] = field(default_factory=lambda: ["http://127.0.0.1:2379"])  # etcd
    address: str = "127.0.0.1:8500"                     # consul
    timeout: float = 5.0                                # seconds, etcd and consul


@dataclass
class CalicoConfig:
    hostname: str = ""
    mtu: int = 1500
    docker_endpoint: str = "unix:///var/run/docker.sock"  # for the leak audit
    docker_timeout: float = 5.0
    ip: str = ""    # address published as bird_ip; "" = auto-detect (backends/calico/routes.py)


@dataclass
class NuageConfig:
    vrs_endpoint: str = "localhost"     # host/IP (TCP, with vrs_port) or unix:/path/db.sock
    vrs_port: int = 6633
    vrs_bridge: str = "alubr0"
    docker_endpoint: str = "unix:///var/run/docker.sock"
    resolve_timeout: float = 10.0       # seconds Join waits for VRS to resolve a vPort
    vrs_timeout: float = 5.0            # seconds for reaching VRS and for one OVSDB transaction
    docker_timeout: float = 3.0         # seconds per Docker API call (never blocks a Join longer)
    hostname: str = ""                  # endpoint records are kept under this host name


@dataclass
class Config:
    path: str = ""
    scope: str = "local"
    backend: str = "calico"
    socket: str = ""
    log_level: str = "info"
    workers: int = 1
    threads: int = 8
    state_dir: str = "/run/netplugin"   # host-local state that dies with the host's containers
    datastore: DatastoreConfig = field(default_factory=DatastoreConfig)
    calico: CalicoConfig = field(default_factory=CalicoConfig)
    nuage: NuageConfig = field(default_factory=NuageConfig)
    #: Things worth telling the operator at start-up (not errors).
    warnings: List[str] = field(default_factory=list)

    @property
    def driver_state_dir(self) -> str:
        """``state_dir/<driver name>``: this plugin's host-local state."""
        return os.path.join(self.state_dir, self.driver_name)

    @property
    def driver_name(self) -> str:
        """The name Docker uses: the socket's basename without ``.sock``."""
        base = os.path.basename(self.socket)
        return base[:-5] if base.endswith(".sock") else base


class _Reader:
    """Typed access to one TOML table, with errors naming file and key."""

    def __init__(self, path: str, table: Dict[str, Any], section: str = ""):
        self.path = path
        self.table = dict(table)
        self.section = section

    def _name(self, key: str) -> str:
        return f"{self.section}.{key}" if self.section else key

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: key '{self._name(key)}' {msg}")

    def pop(self, key: str, kind, default, choices=None, lower=False):
        if key not in self.table:
            return default
        value = self.table.pop(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(key, f"must be a list of strings, got {value!r}")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(key, f"must be {_kind_name(kind)}, got {value!r}")
        if lower:
            value = value.lower()
        if choices is not None and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def table_of(self, key: str) -> "_Reader":
        value = self.table.pop(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table ([{key}]), got {value!r}")
        return _Reader(self.path, value, self._name(key))

    def finish(self) -> None:
        for key, value in self.table.items():
            raise self.fail(key, f"is unknown (value {value!r})")


def _kind_name(kind) -> str:
    return {str: "a string", int: "an integer", float: "a number",
            bool: "a boolean", list: "a list"}.get(kind, kind.__name__)


def default_hostname() -> str:
    """Calico's rule: $HOSTNAME, else the kernel's host name."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


def _default_etcd_endpoints() -> List[str]:
    if os.environ.get("ETCD_ENDPOINTS"):
        return [e.strip() for e in os.environ["ETCD_ENDPOINTS"].split(",") if e.strip()]
    if os.environ.get("ETCD_AUTHORITY"):
        scheme = os.environ.get("ETCD_SCHEME", "http")
        return [f"{scheme}://{os.environ['ETCD_AUTHORITY']}"]
    return ["http://127.0.0.1:2379"]


def parse_config(data: Dict[str, Any], path: str = "<config>") -> Config:
    """Validate a decoded TOML document into a ``Config``."""
    top = _Reader(path, data)
    cfg = Config(path=path)

    # Seed Nuage plugin keys (flat, CamelCase) are aliases.
    seed_nuage = {SEED_NUAGE_ALIASES[k]: top.table.pop(k)
                  for k in list(top.table) if k in SEED_NUAGE_ALIASES}
    for alias, key in SEED_TOP_ALIASES.items():
        if alias in top.table:
            if key in top.table:
                raise top.fail(alias, f"and '{key}' are both set; keep one")
            top.table[key] = top.table.pop(alias)

    from netplugin.backend import available_backends
    backends = available_backends()
    default_backend = "nuage" if seed_nuage else "calico"
    cfg.backend = top.pop("backend", str, default_backend, backends, lower=True)
    cfg.scope = top.pop("scope", str, cfg.scope, SCOPES, lower=True)
    cfg.log_level = top.pop("log_level", str, cfg.log_level, LOG_LEVELS, lower=True)
    cfg.socket = top.pop("socket", str, f"{PLUGIN_DIR}/{cfg.backend}.sock")
    if not cfg.socket.startswith("/") or cfg.socket.endswith("/"):
        raise top.fail("socket", f"must be an absolute path to a socket file, got {cfg.socket!r}")
    cfg.state_dir = top.pop("state_dir", str, cfg.state_dir)
    if not cfg.state_dir.startswith("/"):
        raise top.fail("state_dir", f"must be an absolute path, got {cfg.state_dir!r}")
    cfg.workers = top.pop("workers", int, cfg.workers)
    if not 1 <= cfg.workers <= 64:
        raise top.fail("workers", f"must be between 1 and 64, got {cfg.workers}")
    cfg.threads = top.pop("threads", int, cfg.threads)
    if not 1 <= cfg.threads <= 256:
        raise top.fail("threads", f"must be between 1 and 256, got {cfg.threads}")

    ds = top.table_of("datastore")
    d = cfg.datastore
    d.type = ds.pop("type", str, d.type, DATASTORES, lower=True)
    d.path = ds.pop("path", str, d.path)
    d.endpoints = ds.pop("endpoints", list, None) or _default_etcd_endpoints()
    for e in d.endpoints:
        if "://" not in e:
            raise ds.fail("endpoints", f"entries must look like http://host:port, got {e!r}")
    d.address = ds.pop("address", str, d.address)
    d.timeout = ds.pop("timeout", float, d.timeout)
    if d.timeout <= 0:
        raise ds.fail("timeout", f"must be positive, got {d.timeout}")
    ds.finish()
    if cfg.scope == "global" and d.type == "embedded":
        # Allowed (the seed Nuage plugin's file says Scope = "global" and names
        # no datastore), but only this host will know the networks.
        cfg.warnings.append(
            f"{path}: scope 'global' with datastore type 'embedded': networks are "
            "known on this host only; use 'etcd' or 'consul' to share them")

    ca = top.table_of("calico")
    cfg.calico.hostname = ca.pop("hostname", str, "") or default_hostname()
    cfg.calico.mtu = ca.pop("mtu", int, cfg.calico.mtu)
    if not 68 <= cfg.calico.mtu <= 65535:
        raise ca.fail("mtu", f"must be between 68 and 65535, got {cfg.calico.mtu}")
    cfg.calico.docker_endpoint = ca.pop("docker_endpoint", str, cfg.calico.docker_endpoint)
    if "://" not in cfg.calico.docker_endpoint:
        raise ca.fail("docker_endpoint", "must look like unix:///path/docker.sock or "
                      f"tcp://host:port, got {cfg.calico.docker_endpoint!r}")
    cfg.calico.docker_timeout = ca.pop("docker_timeout", float, cfg.calico.docker_timeout)
    if not 0 < cfg.calico.docker_timeout <= 300:
        raise ca.fail("docker_timeout", "must be between 0 and 300 seconds, got "
                      f"{cfg.calico.docker_timeout}")
    cfg.calico.ip = ca.pop("ip", str, cfg.calico.ip).strip()
    if cfg.calico.ip:
        try:
            cfg.calico.ip = str(ipaddress.IPv4Address(cfg.calico.ip))
        except ValueError:
            raise ca.fail("ip", "must be this host's IPv4 address (or absent: "
                          f"auto-detect), got {cfg.calico.ip!r}") from None
    ca.finish()

    nu_table = top.table.pop("nuage", {})
    if not isinstance(nu_table, dict):
        raise top.fail("nuage", f"must be a table ([nuage]), got {nu_table!r}")
    for key in seed_nuage:
        if key in nu_table:
            alias = next(a for a, k in SEED_NUAGE_ALIASES.items() if k == key)
            raise top.fail(alias, f"and 'nuage.{key}' are both set; keep one")
    nu = _Reader(path, {**seed_nuage, **nu_table}, "nuage")
    n = cfg.nuage
    n.vrs_endpoint = nu.pop("vrs_endpoint", str, n.vrs_endpoint)
    n.vrs_port = nu.pop("vrs_port", int, n.vrs_port)
    if not 1 <= n.vrs_port <= 65535:
        raise nu.fail("vrs_port", f"must be a TCP port, got {n.vrs_port}")
    n.vrs_bridge = nu.pop("vrs_bridge", str, n.vrs_bridge)
    n.docker_endpoint = nu.pop("docker_endpoint", str, n.docker_endpoint)
    n.resolve_timeout = nu.pop("resolve_timeout", float, n.resolve_timeout)
    n.vrs_timeout = nu.pop("vrs_timeout", float, n.vrs_timeout)
    n.docker_timeout = nu.pop("docker_timeout", float, n.docker_timeout)
    for key in ("resolve_timeout", "vrs_timeout", "docker_timeout"):
        value = getattr(n, key)
        if not 0 < value <= 300:
            raise nu.fail(key, f"must be between 0 and 300 seconds, got {value}")
    n.vrs_endpoint = n.vrs_endpoint.strip()
    vrs_path = n.vrs_endpoint[5:] if n.vrs_endpoint.startswith("unix:") else None
    if vrs_path is not None and not vrs_path.startswith("/"):
        raise nu.fail("vrs_endpoint", f"must be unix:/absolute/path/db.sock, got {n.vrs_endpoint!r}")
    if vrs_path is None and (not n.vrs_endpoint or "/" in n.vrs_endpoint
                             or any(c.isspace() for c in n.vrs_endpoint)):
        raise nu.fail("vrs_endpoint", "must be a host name, an IP address or "
                      f"unix:/path/db.sock, got {n.vrs_endpoint!r}")
    if not n.vrs_bridge.strip():
        raise nu.fail("vrs_bridge", "must not be empty")
    if "://" not in n.docker_endpoint:
        raise nu.fail("docker_endpoint", "must look like unix:///path/docker.sock or "
                      f"tcp://host:port, got {n.docker_endpoint!r}")
    n.hostname = nu.pop("hostname", str, "") or default_hostname()
    nu.finish()

    top.finish()
    return cfg


def load_config(path: str) -> Config:
    """Read and validate ``path``; raise ``ConfigError`` on any user error."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    return parse_config(data, path)


def config_from_text(text: str, path: str = "<string>") -> Config:
    """Parse TOML text (tests and tools)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    return parse_config(data, path)


def describe(cfg: Optional[Config]) -> str:  # used in the start-up log line
    if cfg is None:
        return "<no config>"
    return (f"backend={cfg.backend} scope={cfg.scope} socket={cfg.socket} "
            f"datastore={cfg.datastore.type}")
