"""The Nuage backend's ``[nuage]`` config table: ``NuageConfig``, its parsing and checks.
Owns the [nuage] keys, their defaults, the seed plugin's aliases and their errors.

``netplugin.config`` finds this module by name (``backends.<name>.config``):
it moves the seed Nuage plugin's flat keys (``TOP_LEVEL_ALIASES``) into the
table, and calls ``parse`` with a ``netplugin.configfile.Reader`` on it; the
result is ``cfg.nuage``.  Errors name the file, the key and the value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from netplugin.configfile import Reader, default_hostname

if TYPE_CHECKING:  # pragma: no cover
    from netplugin.config import Config

#: Top-level keys of the seed Nuage plugin's nuage.cfg, accepted as aliases
#: of keys of [nuage]; a file with one of them and no ``backend`` key means
#: ``backend = "nuage"``.
TOP_LEVEL_ALIASES = {
    "VrsEndpoint": "vrs_endpoint",
    "VrsPort": "vrs_port",
    "VrsBridge": "vrs_bridge",
    "DockerEndpoint": "docker_endpoint",
}


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
    audit_interval: float = 60.0        # seconds between two runs of the agent's audit
    audit_grace: float = 3.0            # seconds between the audit's two looks


def parse(nu: Reader, cfg: "Config") -> NuageConfig:
    """Validate the ``[nuage]`` table (``nu``); the caller checks no key is left."""
    n = NuageConfig()
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
        raise nu.fail("vrs_endpoint",
                      f"must be unix:/absolute/path/db.sock, got {n.vrs_endpoint!r}")
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
    n.audit_interval = nu.pop("audit_interval", float, n.audit_interval)
    if not 0.1 <= n.audit_interval <= 86400:
        raise nu.fail("audit_interval", "must be between 0.1 and 86400 seconds, got "
                      f"{n.audit_interval}")
    n.audit_grace = nu.pop("audit_grace", float, n.audit_grace)
    if not 0 <= n.audit_grace <= 600:
        raise nu.fail("audit_grace", f"must be between 0 and 600 seconds, got {n.audit_grace}")
    return n
