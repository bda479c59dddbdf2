"""The Calico backend's ``[calico]`` config table: ``CalicoConfig``, its parsing and checks.
Owns the [calico] keys, their defaults and their file/key/line errors; nothing else reads the table.

``netplugin.config`` finds this module by name (``backends.<name>.config``)
and calls ``parse`` with a ``netplugin.configfile.Reader`` on the table and
the front-end's ``Config`` (its datastore timeout and warnings); the result
is ``cfg.calico``.  Errors name the file, the key and the value.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from netplugin.configfile import Reader, default_hostname

if TYPE_CHECKING:  # pragma: no cover
    from netplugin.config import Config

AUDIT_MARGIN = 5.0   # seconds added to the datastore timeout for the default audit_grace


@dataclass
class CalicoConfig:
    hostname: str = ""
    mtu: int = 1500
    docker_endpoint: str = "unix:///var/run/docker.sock"  # audit, network names
    docker_timeout: float = 5.0
    ip: str = ""    # address published as bird_ip; "" = auto-detect (backends/calico/routes.py)
    audit_interval: float = 60.0   # seconds between two runs of the agent's leak reconciler
    #: seconds a leak must stay orphaned before it is removed; None = the
    #: datastore timeout + AUDIT_MARGIN (an allocation in flight is older than that)
    audit_grace: Optional[float] = None
    ip6: str = ""   # IPv6 address published as bird6_ip; "" = auto-detect


def parse(ca: Reader, cfg: "Config") -> CalicoConfig:
    """Validate the ``[calico]`` table (``ca``); the caller checks no key is left."""
    c = CalicoConfig()
    path = ca.path
    timeout = cfg.datastore.timeout
    c.hostname = ca.pop("hostname", str, "") or default_hostname()
    c.mtu = ca.pop("mtu", int, c.mtu)
    if not 68 <= c.mtu <= 65535:
        raise ca.fail("mtu", f"must be between 68 and 65535, got {c.mtu}")
    c.docker_endpoint = ca.pop("docker_endpoint", str, c.docker_endpoint)
    if "://" not in c.docker_endpoint:
        raise ca.fail("docker_endpoint", "must look like unix:///path/docker.sock or "
                      f"tcp://host:port, got {c.docker_endpoint!r}")
    c.docker_timeout = ca.pop("docker_timeout", float, c.docker_timeout)
    if not 0 < c.docker_timeout <= 300:
        raise ca.fail("docker_timeout", "must be between 0 and 300 seconds, got "
                      f"{c.docker_timeout}")
    c.ip = _host_address(ca, "ip", c.ip, ipaddress.IPv4Address, "IPv4")
    c.audit_interval = ca.pop("audit_interval", float, c.audit_interval)
    if not 0.1 <= c.audit_interval <= 86400:
        raise ca.fail("audit_interval", "must be between 0.1 and 86400 seconds, got "
                      f"{c.audit_interval}")
    grace = ca.pop("audit_grace", float, None)
    if grace is not None and not 0 <= grace <= 600:
        raise ca.fail("audit_grace", f"must be between 0 and 600 seconds, got {grace}")
    c.audit_grace = grace if grace is not None else timeout + AUDIT_MARGIN
    if c.audit_grace < timeout:
        cfg.warnings.append(
            f"{path}: [calico] audit_grace {c.audit_grace} s is shorter than the "
            f"datastore timeout ({timeout} s): the audit may release an address whose "
            "allocation is still in flight")
    c.ip6 = _host_address(ca, "ip6", c.ip6, ipaddress.IPv6Address, "IPv6")
    return c


def _host_address(ca, key: str, default: str, kind, family: str) -> str:
    """``[calico] ip`` / ``ip6``: this host's address, "" to auto-detect."""
    text = ca.pop(key, str, default).strip()
    if not text:
        return ""
    try:
        return str(kind(text))
    except ValueError:
        raise ca.fail(key, f"must be this host's {family} address (or absent: "
                      f"auto-detect), got {text!r}") from None
