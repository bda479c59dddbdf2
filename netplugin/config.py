"""The front-end's configuration (``Config``): the top-level keys and ``[datastore]``.
Owns: the front-end's keys only; each ``[<name>]`` table is ``backends.<name>.config``'s.

Every user error raises ``ConfigError`` with one line naming the file, the key
and the value (``netplugin.configfile``); ``netplugin.cli`` prints it and exits
non-zero.  See README.md ("Configuration reference") for every key.

A backend package ``backends/<name>/`` with a ``config`` module owns the
``[<name>]`` table: the module is found by name (never imported statically:
the front-end knows no backend) and defines ``parse(reader, cfg)``, whose
result is ``cfg.<name>``, and optionally ``TOP_LEVEL_ALIASES`` (flat keys of
an older file format that belong to its table).  Every backend's table is
checked, whichever backend is chosen.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from netplugin.configfile import Reader, read_file, read_text

SCOPES = ("local", "global")
DATASTORES = ("embedded", "etcd", "etcdv3", "consul")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PLUGIN_DIR = "/run/docker/plugins"
DEFAULT_BACKEND = "calico"

# Top-level keys of the seed Nuage plugin's nuage.cfg, accepted as aliases.
SEED_TOP_ALIASES = {"LogLevel": "log_level", "Scope": "scope"}


@dataclass
class DatastoreConfig:
    type: str = "embedded"
    path: str = "/var/lib/netplugin/state.db"          # embedded
    endpoints: List[str] = field(default_factory=lambda: ["http://127.0.0.1:2379"])  # etcd
    address: str = "127.0.0.1:8500"                     # consul
    timeout: float = 5.0                                # seconds, etcd and consul
    ca_file: str = ""        # etcd/etcdv3 TLS: the CA that signs the members' certificates
    cert_file: str = ""      # client certificate (with key_file)
    key_file: str = ""
    username: str = ""       # etcd auth (with password)
    password: str = ""


@dataclass
class Config:
    path: str = ""
    scope: str = "local"
    backend: str = "calico"
    socket: str = ""
    socket_group: str = ""              # group of the 0660 socket; "" = docker if it exists
    log_level: str = "info"
    workers: int = 1
    threads: int = 8
    metrics_address: str = ""           # "127.0.0.1:9091": /metrics and /health on TCP too
    state_dir: str = "/run/netplugin"   # host-local state that dies with the host's containers
    datastore: DatastoreConfig = field(default_factory=DatastoreConfig)
    #: each backend's table as its ``backends.<name>.config.parse`` returned
    #: it, by name; read as an attribute: ``cfg.calico``, ``cfg.nuage``
    tables: Dict[str, Any] = field(default_factory=dict)
    #: Things worth telling the operator at start-up (not errors).
    warnings: List[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        # only called for names that are no field: a backend's table
        try:
            return self.__dict__["tables"][name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute "
                                 f"{name!r}") from None

    @property
    def driver_state_dir(self) -> str:
        """``state_dir/<driver name>``: this plugin's host-local state."""
        return os.path.join(self.state_dir, self.driver_name)

    @property
    def driver_name(self) -> str:
        """The name Docker uses: the socket's basename without ``.sock``."""
        base = os.path.basename(self.socket)
        return base[:-5] if base.endswith(".sock") else base


def _default_etcd_endpoints() -> List[str]:
    if os.environ.get("ETCD_ENDPOINTS"):
        return [e.strip() for e in os.environ["ETCD_ENDPOINTS"].split(",") if e.strip()]
    if os.environ.get("ETCD_AUTHORITY"):
        scheme = os.environ.get("ETCD_SCHEME", "http")
        return [f"{scheme}://{os.environ['ETCD_AUTHORITY']}"]
    return ["http://127.0.0.1:2379"]


def available_backends() -> List[str]:
    """Names of the packages under ``backends/`` (without importing them)."""
    spec = importlib.util.find_spec("backends")
    if spec is None or spec.submodule_search_locations is None:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)
                  if m.ispkg)


def backend_tables() -> List[Tuple[str, Any]]:
    """``(name, module)`` of each backend with a table parser, ``backends.<name>.config``."""
    found = []
    for name in available_backends():
        module = f"backends.{name}.config"
        if importlib.util.find_spec(module) is not None:
            found.append((name, importlib.import_module(module)))
    return found


def parse_config(data: Dict[str, Any], path: str = "<config>") -> Config:
    """Validate a decoded TOML document into a ``Config``."""
    top = Reader(path, data)
    cfg = Config(path=path)
    tables = backend_tables()

    # Flat keys of an older format (the seed Nuage plugin's CamelCase ones)
    # belong to a backend's table.
    aliased: Dict[str, Dict[str, Any]] = {}
    for name, module in tables:
        aliases = getattr(module, "TOP_LEVEL_ALIASES", {})
        aliased[name] = {aliases[k]: top.table.pop(k) for k in list(top.table) if k in aliases}
    for alias, key in SEED_TOP_ALIASES.items():
        if alias in top.table:
            if key in top.table:
                raise top.fail(alias, f"and '{key}' are both set; keep one")
            top.table[key] = top.table.pop(alias)

    backends = available_backends()
    default_backend = next((name for name, _ in tables if aliased[name]), DEFAULT_BACKEND)
    cfg.backend = top.pop("backend", str, default_backend, backends, lower=True)
    cfg.scope = top.pop("scope", str, cfg.scope, SCOPES, lower=True)
    cfg.log_level = top.pop("log_level", str, cfg.log_level, LOG_LEVELS, lower=True)
    cfg.socket = top.pop("socket", str, f"{PLUGIN_DIR}/{cfg.backend}.sock")
    if not cfg.socket.startswith("/") or cfg.socket.endswith("/"):
        raise top.fail("socket", f"must be an absolute path to a socket file, got {cfg.socket!r}")
    cfg.socket_group = top.pop("socket_group", str, cfg.socket_group)
    if cfg.socket_group and not cfg.socket_group.isdigit():
        import grp
        try:
            grp.getgrnam(cfg.socket_group)
        except KeyError:
            raise top.fail("socket_group", f"names no group on this host, got "
                                           f"{cfg.socket_group!r} (see /etc/group)") from None
    cfg.state_dir = top.pop("state_dir", str, cfg.state_dir)
    if not cfg.state_dir.startswith("/"):
        raise top.fail("state_dir", f"must be an absolute path, got {cfg.state_dir!r}")
    cfg.workers = top.pop("workers", int, cfg.workers)
    if not 1 <= cfg.workers <= 64:
        raise top.fail("workers", f"must be between 1 and 64, got {cfg.workers}")
    cfg.threads = top.pop("threads", int, cfg.threads)
    if not 1 <= cfg.threads <= 256:
        raise top.fail("threads", f"must be between 1 and 256, got {cfg.threads}")
    cfg.metrics_address = top.pop("metrics_address", str, cfg.metrics_address)
    if cfg.metrics_address:
        try:
            split_address(cfg.metrics_address)
        except ValueError as exc:
            raise top.fail("metrics_address", str(exc)) from None

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
    for key in ("ca_file", "cert_file", "key_file", "username", "password"):
        setattr(d, key, ds.pop(key, str, ""))
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(d, key)
        if value and not os.path.isabs(value):
            raise ds.fail(key, f"must be an absolute path, got {value!r}")
    if bool(d.cert_file) != bool(d.key_file):
        raise ds.fail("cert_file" if d.key_file else "key_file",
                      "must be set together with "
                      f"'datastore.{'cert_file' if d.cert_file else 'key_file'}'")
    if bool(d.username) != bool(d.password):
        raise ds.fail("password" if d.username else "username",
                      "must be set together with "
                      f"'datastore.{'username' if d.username else 'password'}'")
    if d.type not in ("etcd", "etcdv3"):
        for key in ("ca_file", "cert_file", "key_file", "username"):
            if getattr(d, key):
                raise ds.fail(key, f"applies to the etcd and etcdv3 types only, not {d.type!r}")
    ds.finish()
    if cfg.scope == "global" and d.type == "embedded":
        # Allowed (the seed Nuage plugin's file says Scope = "global" and names
        # no datastore), but only this host will know the networks.
        cfg.warnings.append(
            f"{path}: scope 'global' with datastore type 'embedded': networks are "
            "known on this host only; use 'etcd', 'etcdv3' or 'consul' to share them")

    for name, module in tables:
        table = top.table.pop(name, {})
        if not isinstance(table, dict):
            raise top.fail(name, f"must be a table ([{name}]), got {table!r}")
        aliases = getattr(module, "TOP_LEVEL_ALIASES", {})
        for key in aliased[name]:
            if key in table:
                alias = next(a for a, k in aliases.items() if k == key)
                raise top.fail(alias, f"and '{name}.{key}' are both set; keep one")
        reader = Reader(path, {**aliased[name], **table}, name)
        cfg.tables[name] = module.parse(reader, cfg)
        reader.finish()

    top.finish()
    return cfg


def load_config(path: str) -> Config:
    """Read and validate ``path``; raise ``ConfigError`` on any user error."""
    return parse_config(read_file(path), path)


def config_from_text(text: str, path: str = "<string>") -> Config:
    """Parse TOML text (tests and tools)."""
    return parse_config(read_text(text, path), path)


def split_address(text: str):
    """``"127.0.0.1:9091"`` (or ``"[::1]:9091"``) -> ("127.0.0.1", 9091)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT such as 127.0.0.1:9091, got {text!r}")
    return host, int(port)


def describe(cfg: Optional[Config]) -> str:  # used in the start-up log line
    if cfg is None:
        return "<no config>"
    return (f"backend={cfg.backend} scope={cfg.scope} socket={cfg.socket} "
            f"datastore={cfg.datastore.type}")
