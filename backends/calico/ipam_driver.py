"""Docker IpamDriver calls of the calico backend (``--ipam-driver calico``),
on top of Calico IPAM v2 (``backends.calico.ipam``).

Pool IDs (what dockerd stores and sends back with every RequestAddress):

- ``CalicoPoolIPv4`` / ``CalicoPoolIPv6``: no ``--subnet``; addresses come
  from every enabled Calico IPAM pool of that version.
- ``<cidr>`` (e.g. ``192.168.0.0/16``, as the Python and Go Calico plugins
  did): ``--subnet <cidr>`` (which must equal or lie inside an enabled Calico
  pool), or ``--ipam-opt pool=<cidr>`` without ``--subnet``; addresses come
  from that CIDR only.

The Pool answered for a network without ``--subnet`` is never a real range:
dockerd 20.10 re-asks, without end, when the answer overlaps one of the host's
IPv4 routes or a nameserver in /etc/resolv.conf, and a routed plugin adds a
host route per container.  ``0.0.0.0/0`` is the one IPv4 value dockerd never
checks.  For IPv6 ``::/0`` is checked (it overlaps any IPv6 nameserver), so the
answer is ``100::/64``, the discard-only prefix (RFC 6666): no nameserver lives
there, and dockerd compares IPv6 pools with nameservers only (its route check
reads the IPv4 table).  Containers still get Calico addresses: Docker uses the
address RequestAddress answers (/32, /128) without matching it to the pool.

The answer's Data carries ``com.docker.network.gateway`` = ``0.0.0.0/0`` /
``::/0``, so dockerd asks for no gateway address and CreateNetwork sees that
marker as the gateway (how the network driver recognises Calico IPAM).

Datastore cost: RequestPool 0R (1R with --subnet or the pool option),
RequestAddress 2R 1W when the host's block has room (see ``ipam``),
ReleaseAddress 1R 1W (0 for the gateway marker), ReleasePool 0.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Dict, List, Optional, Tuple

from netplugin import protocol as p
from netplugin.errors import InvalidRequest, NotFound, NotSupported

from backends.calico import ipam as calico_ipam
from backends.calico.ipam import CalicoIpam, IPNetwork, Pool

log = logging.getLogger(__name__)

LOCAL_ADDRESS_SPACE = "CalicoLocalAddressSpace"
GLOBAL_ADDRESS_SPACE = "CalicoGlobalAddressSpace"
ADDRESS_SPACES = (LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE)

POOL_ID = {4: "CalicoPoolIPv4", 6: "CalicoPoolIPv6"}
#: Pool answered when Docker gave no --subnet (see the module docstring).
ANY_POOL = {4: "0.0.0.0/0", 6: "100::/64"}
#: Gateway marker (RequestPool Data, gateway RequestAddress, CreateNetwork Gateway).
GATEWAY_MARKER = {4: "0.0.0.0/0", 6: "::/0"}
GATEWAY_DATA_KEY = "com.docker.network.gateway"
#: Addresses dockerd releases for the marker gateway ("0.0.0.0", "::").
MARKER_RELEASES = ("0.0.0.0", "::")

#: ``--ipam-opt`` keys.
POOL_OPTION = "pool"
IPAM_OPTIONS = (POOL_OPTION,)


def parse_pool_id(pool_id: str) -> Tuple[int, Optional[IPNetwork]]:
    """PoolID -> (IP version, CIDR the network allocates from or None = any pool)."""
    for version, name in POOL_ID.items():
        if pool_id == name:
            return version, None
    try:
        net = ipaddress.ip_network(pool_id, strict=True)
    except ValueError:
        raise InvalidRequest(f"unknown PoolID {pool_id!r}: the calico IPAM driver "
                             f"issues {POOL_ID[4]}, {POOL_ID[6]} or a CIDR") from None
    if "/" not in pool_id:
        raise InvalidRequest(f"unknown PoolID {pool_id!r}: not a CIDR")
    return net.version, net


def _pool_option(options: Dict[str, str], version: int) -> Optional[IPNetwork]:
    """The CIDR of ``--ipam-opt pool=<cidr>[,<cidr>]`` for ``version``, if any;
    unknown options are refused."""
    unknown = sorted(k for k in options if k not in IPAM_OPTIONS)
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise InvalidRequest(f"unknown IPAM option{'s' if len(unknown) > 1 else ''} {names} "
                             f"for the calico IPAM driver; known options: "
                             f"{', '.join(IPAM_OPTIONS)} (pool=<Calico pool CIDR>, one per "
                             f"IP version, comma-separated)")
    text = options.get(POOL_OPTION)
    if text is None:
        return None
    found: Dict[int, IPNetwork] = {}
    for part in (t.strip() for t in text.split(",")):
        try:
            net = ipaddress.ip_network(part, strict=False)
            if "/" not in part:
                raise ValueError
        except ValueError:
            raise InvalidRequest(f"IPAM option pool={text!r}: {part!r} is not a CIDR "
                                 f"such as 192.168.0.0/16") from None
        if net.version in found:
            raise InvalidRequest(f"IPAM option pool={text!r} names more than one "
                                 f"IPv{net.version} pool")
        found[net.version] = net
    return found.get(version)


def _pools_text(pools: List[Pool], version: int) -> str:
    if not pools:
        return f"there are no Calico IPv{version} pools"
    return f"existing IPv{version} pools: " + ", ".join(
        f"{p.cidr}" if p.enabled else f"{p.cidr} ({p.state()})" for p in pools)


class CalicoIpamDriver:
    """Mixin for ``CalicoBackend``: the IpamDriver calls.  Needs ``self.datastore``
    and ``self.config.calico.hostname``."""

    _ipam_client: Optional[CalicoIpam] = None

    @property
    def ipam(self) -> CalicoIpam:
        client = self._ipam_client
        if client is None or client.datastore is not self.datastore:
            client = self._ipam_client = CalicoIpam(self.datastore)
        return client

    @property
    def ipam_host(self) -> str:
        return self.config.calico.hostname

    # -- capabilities ----------------------------------------------------------
    def ipam_capabilities(self) -> p.IpamCapabilities:
        return p.IpamCapabilities(requires_mac_address=False)

    def get_default_address_spaces(self) -> p.AddressSpaces:
        return p.AddressSpaces(LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE)

    # -- pools -------------------------------------------------------------------
    def request_pool(self, req: p.RequestPoolRequest) -> p.RequestPoolResponse:
        version = 6 if req.v6 else 4
        if req.sub_pool:
            raise NotSupported(
                f"--ip-range ({req.sub_pool}) is not supported by the calico IPAM driver: "
                f"addresses come from Calico pools; use --subnet with a Calico pool or a "
                f"subnet inside one instead")
        chosen = _pool_option(req.options, version)
        data = {GATEWAY_DATA_KEY: GATEWAY_MARKER[version]}
        if not req.pool and chosen is None:
            return p.RequestPoolResponse(POOL_ID[version], ANY_POOL[version], data)

        pools = self.ipam.pools(version)
        enabled = [pl for pl in pools if pl.enabled]
        if chosen is not None:
            holder = self._holder(chosen, enabled)
            if holder is None:
                raise NotFound(f"IPAM option pool={chosen} is not an enabled Calico IPAM "
                               f"pool (nor inside one); {_pools_text(pools, version)}")
        if not req.pool:
            # --ipam-opt pool without --subnet: dockerd checks the answer for
            # overlaps, so the Pool stays the marker; the PoolID pins the pool.
            return p.RequestPoolResponse(str(chosen), ANY_POOL[version], data)

        subnet = ipaddress.ip_network(req.pool, strict=False)
        if self._holder(subnet, enabled) is None:
            raise NotFound(f"subnet {subnet} is not inside an enabled Calico IPAM pool; "
                           f"{_pools_text(pools, version)}; use --subnet with one of them "
                           f"(or a subnet inside one), or add a pool with calicoctl")
        if chosen is not None and not subnet.subnet_of(chosen):
            raise InvalidRequest(f"subnet {subnet} is not inside the pool {chosen} "
                                 f"chosen with --ipam-opt pool")
        return p.RequestPoolResponse(str(subnet), str(subnet), data)

    @staticmethod
    def _holder(net: IPNetwork, pools: List[Pool]) -> Optional[Pool]:
        for pool in pools:
            if net.subnet_of(pool.cidr):
                return pool
        return None

    def release_pool(self, req: p.ReleasePoolRequest) -> None:
        # Shared PoolIDs come back once per network: nothing to free.
        return None

    # -- addresses -------------------------------------------------------------------
    def request_address(self, req: p.RequestAddressRequest) -> p.RequestAddressResponse:
        version, within = parse_pool_id(req.pool_id)
        if req.is_gateway:
            # Calico networks have no gateway address: 169.254.1.1 / the host
            # veth answer for it (see driver.join).  Nothing is allocated.
            return p.RequestAddressResponse(GATEWAY_MARKER[version])
        host = self.ipam_host
        plen = 32 if version == 4 else 128
        if not req.address:
            ip = self.ipam.auto_assign_one(version, host, within)
            log.info("assigned %s to a container on host %s (pool %s)", ip, host, req.pool_id)
            return p.RequestAddressResponse(f"{ip}/{plen}")
        ip = ipaddress.ip_address(req.address)
        if ip.version != version:
            raise InvalidRequest(f"address {ip} is not an IPv{version} address "
                                 f"(pool {req.pool_id})")
        if within is not None and ip not in within:
            raise calico_ipam.AddressNotInPool(
                f"address {ip} is outside the network's subnet {within}")
        self.ipam.assign_ip(ip, host, secondary={})
        log.info("assigned requested address %s on host %s (pool %s)", ip, host, req.pool_id)
        return p.RequestAddressResponse(f"{ip}/{plen}")

    def release_address(self, req: p.ReleaseAddressRequest) -> None:
        ip = ipaddress.ip_address(req.address)
        if str(ip) in MARKER_RELEASES:
            return None           # the marker gateway: never allocated
        not_allocated = self.ipam.release_ips([ip])
        if not_allocated:
            log.info("released %s, which was not allocated (pool %s)", ip, req.pool_id)
        else:
            log.info("released %s (pool %s)", ip, req.pool_id)
        return None
