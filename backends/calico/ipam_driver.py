"""Docker IpamDriver calls of the calico backend (``--ipam-driver calico``):
PoolIDs, address handles and ownership, on Calico IPAM v2 (``ipam``).

Pool IDs (what dockerd stores and sends back with every RequestAddress):

- ``CalicoPoolIPv4`` / ``CalicoPoolIPv6``: no ``--subnet``; addresses come
  from every enabled Calico IPAM pool of that version.
- ``<cidr>`` (e.g. ``192.168.0.0/16``, as the Python and Go Calico plugins
  did): ``--subnet <cidr>`` (which must equal or lie inside an enabled Calico
  pool), or ``--ipam-opt pool=<cidr>`` without ``--subnet``; addresses come
  from that CIDR only.
- ``swarm:<token>:`` + one of the above: the same pool asked for in the
  *global* address space, i.e. by a swarm manager (or for a 20.10
  cluster-store network); ``<token>`` is new for every RequestPool, so the
  PoolID names one network, and every address allocated for it carries the
  Calico IPAM handle ``swarm-<token>``: ReleasePool frees whatever of them
  Docker did not release one by one (load-balancer and VIP addresses).

Swarm drives the driver twice per address: the manager allocates it (global
PoolID), then the node where the task lands asks, with its own local PoolID,
for exactly that address.  The manager's allocation is the truth: such a
node request is answered with the address without allocating it again (its
block attribute says ``"space": "swarm"``), the node's ReleaseAddress of it
frees nothing, and the manager's ReleaseAddress frees it once.  A local
request for an address someone else allocated in the local space still
fails.

Ownership: every address a local PoolID allocates carries the Calico IPAM
handle ``netplugin.<pool tag>.<owner>`` (and a handle key, as Calico CNI's
``k8s-pod-network.<container>``): the pool tag is the PoolID with ``/`` as
``-``; the owner is ``mac-<12 hex>`` when the request names the endpoint's
MAC (Options ``com.docker.network.endpoint.macaddress``), else
``req-<16 hex>``, new for every request (Docker's RequestAddress names no
endpoint).  So:

- ReleaseAddress frees only an address the PoolID handed out (its pool tag,
  or its ``swarm-<token>``); another pool's address, or one not allocated,
  is an Err and nothing changes.  An allocation without a handle (older
  plugins, calicoctl) is released by any PoolID whose range holds it.
- RequestAddress for an address already held by the same owner of the same
  PoolID (a MAC owner) answers it again; any other owner is refused.
- The audit (``backends.calico.audit``) treats ``netplugin.`` handles as its
  own (it may release them when orphaned); ``swarm-`` handles and foreign
  ones are never its to release.

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
RequestAddress 2R 2W when the host's block has room (see ``ipam``; one W
creates the request's handle key; 2R more with a MAC owner: the handle
read), ReleaseAddress 2R 1W 1D
(the block, the handle; 0 for the gateway marker), ReleasePool 0 (a
global-space pool: 1R, and what freeing its leftover addresses costs).
"""
from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from typing import Dict, List, Optional, Tuple

from netplugin import protocol as p
from netplugin.backend import IpamDriver
from netplugin.errors import Conflict, InvalidRequest, NotFound, NotSupported

from backends.calico import ipam as calico_ipam
from backends.calico.ipam import CalicoIpam
from backends.calico.model import (ADDRESS_SPACES, GATEWAY_MARKER, GLOBAL_ADDRESS_SPACE,
                                   IPAM_HANDLE_PREFIX, LOCAL_ADDRESS_SPACE, IPNetwork, Pool,
                                   is_our_ipam_handle)

log = logging.getLogger(__name__)

__all__ = ["ADDRESS_SPACES", "GATEWAY_MARKER", "GLOBAL_ADDRESS_SPACE", "LOCAL_ADDRESS_SPACE"]

POOL_ID = {4: "CalicoPoolIPv4", 6: "CalicoPoolIPv6"}
#: Pool answered when Docker gave no --subnet (see the module docstring).
ANY_POOL = {4: "0.0.0.0/0", 6: "100::/64"}
GATEWAY_DATA_KEY = "com.docker.network.gateway"
#: Addresses dockerd releases for the marker gateway ("0.0.0.0", "::").
MARKER_RELEASES = ("0.0.0.0", "::")

#: PoolID prefix of the pools asked for in the global address space.
SWARM_PREFIX = "swarm:"
#: Block attribute (``secondary``) of the addresses a swarm manager allocated.
SWARM_SECONDARY = {"space": "swarm"}

#: ``--ipam-opt`` keys.
POOL_OPTION = "pool"
IPAM_OPTIONS = (POOL_OPTION,)


_MAC_RE = re.compile(r"^([0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}$")


class NotOwner(Conflict):
    """ReleaseAddress of an address another PoolID handed out."""


class NotAllocated(NotFound):
    """ReleaseAddress of an address that is not allocated."""


def pool_tag(pool_id: str) -> str:
    """The part of a handle naming the (local) PoolID: ``/`` as ``-``."""
    return split_pool_id(pool_id)[1].replace("/", "-")


def request_owner(options: Dict[str, str]) -> Tuple[str, bool]:
    """(owner key, whether it names the endpoint) of a RequestAddress."""
    mac = options.get(p.MAC_OPTION)
    if mac:
        if not isinstance(mac, str) or not _MAC_RE.match(mac):
            raise InvalidRequest(f"Options[{p.MAC_OPTION!r}] is not a MAC address: {mac!r}")
        return "mac-" + re.sub(r"[:-]", "", mac).lower(), True
    return "req-" + uuid.uuid4().hex[:16], False


def address_handle(pool_id: str, owner: str) -> str:
    return f"{IPAM_HANDLE_PREFIX}{pool_tag(pool_id)}.{owner}"


def handle_pool_tag(handle_id: Optional[str]) -> Optional[str]:
    """The pool tag of one of our handles, else None."""
    if not is_our_ipam_handle(handle_id):
        return None
    rest = handle_id[len(IPAM_HANDLE_PREFIX):]
    tag, _, owner = rest.rpartition(".")
    return tag if tag and owner else None


def handed_out_by(pool_id: str, attributes: Optional[dict], ip) -> bool:
    """Did ``pool_id`` allocate the address with these block attributes?"""
    if attributes is None:
        return False
    handle = attributes.get("handle_id")
    swarm_handle = split_pool_id(pool_id)[0]
    if swarm_handle is not None:
        return handle == swarm_handle
    if handle is None:        # written without a handle (older plugins, calicoctl)
        within = parse_pool_id(pool_id)[1]
        return within is None or ip in within
    return handle_pool_tag(handle) == pool_tag(pool_id)


def is_swarm_allocation(attributes: Optional[dict]) -> bool:
    """Block attributes of an address a swarm manager (global space) allocated."""
    secondary = (attributes or {}).get("secondary")
    return isinstance(secondary, dict) and secondary.get("space") == SWARM_SECONDARY["space"]


def split_pool_id(pool_id: str) -> Tuple[Optional[str], str]:
    """PoolID -> (the IPAM handle of a global-space pool or None, the PoolID
    without its swarm prefix)."""
    if pool_id.startswith(SWARM_PREFIX):
        token, _, base = pool_id[len(SWARM_PREFIX):].partition(":")
        if token and base:
            return f"swarm-{token}", base
    return None, pool_id


def parse_pool_id(pool_id: str) -> Tuple[int, Optional[IPNetwork]]:
    """PoolID -> (IP version, CIDR the network allocates from or None = any pool)."""
    pool_id = split_pool_id(pool_id)[1]
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


class CalicoIpamDriver(IpamDriver):
    """The IpamDriver role of ``CalicoBackend`` (a base class of it).  Needs
    ``self.datastore`` and ``self.config.calico.hostname``."""

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
        answer = self._request_pool(req)
        if req.address_space == GLOBAL_ADDRESS_SPACE:
            pool_id = f"{SWARM_PREFIX}{uuid.uuid4().hex[:12]}:{answer.pool_id}"
            return p.RequestPoolResponse(pool_id, answer.pool, answer.data)
        return answer

    def _request_pool(self, req: p.RequestPoolRequest) -> p.RequestPoolResponse:
        version = 6 if req.v6 else 4
        if req.sub_pool:
            raise NotSupported(
                f"--ip-range ({req.sub_pool}) is not supported by the calico IPAM driver: "
                f"addresses come from Calico pools; use --subnet with a Calico pool or a "
                f"subnet inside one instead")
        chosen = _pool_option(req.options, version)
        data = {GATEWAY_DATA_KEY: GATEWAY_MARKER[version]}
        if req.pool and ipaddress.ip_network(req.pool, strict=False) == \
                ipaddress.ip_network(ANY_POOL[version]):
            # A swarm node asks for the pool its manager was answered: the
            # marker of a network without --subnet.
            req = p.RequestPoolRequest(req.address_space, "", req.sub_pool, req.options, req.v6)
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
        handle = split_pool_id(req.pool_id)[0]
        if handle is None:
            return None       # shared local PoolIDs come back once per network
        freed = self.ipam.release_by_handle(handle)
        if freed:
            log.info("released %d address(es) of pool %s with it: %s", len(freed),
                     req.pool_id, ", ".join(str(a) for a in freed))
        return None

    # -- addresses -------------------------------------------------------------------
    def request_address(self, req: p.RequestAddressRequest) -> p.RequestAddressResponse:
        version, within = parse_pool_id(req.pool_id)
        handle = split_pool_id(req.pool_id)[0]
        swarm = handle is not None
        if req.is_gateway:
            # Calico networks have no gateway address: 169.254.1.1 / the host
            # veth answer for it (see driver.join).  Nothing is allocated.
            return p.RequestAddressResponse(GATEWAY_MARKER[version])
        named = False
        if not swarm:
            owner, named = request_owner(req.options)
            handle = address_handle(req.pool_id, owner)
        host = self.ipam_host
        plen = 32 if version == 4 else 128
        secondary = dict(SWARM_SECONDARY) if swarm else {}
        if not req.address:
            if named:    # the same endpoint asks again: its address
                held = [a for a in self.ipam.addresses_of_handle(handle) if a.version == version]
                if held:
                    log.info("%s already holds %s (pool %s)", handle, held[0], req.pool_id)
                    return p.RequestAddressResponse(f"{held[0]}/{plen}")
            ip = self.ipam.auto_assign_one(version, host, within, handle_id=handle,
                                           secondary=secondary if swarm else None,
                                           fresh_handle=not (swarm or named))
            log.info("assigned %s to a container on host %s (pool %s)", ip, host, req.pool_id)
            return p.RequestAddressResponse(f"{ip}/{plen}")
        ip = ipaddress.ip_address(req.address)
        if ip.version != version:
            raise InvalidRequest(f"address {ip} is not an IPv{version} address "
                                 f"(pool {req.pool_id})")
        if within is not None and ip not in within:
            raise calico_ipam.AddressNotInPool(
                f"address {ip} is outside the network's subnet {within}")
        try:
            self.ipam.assign_ip(ip, host, handle_id=handle, secondary=secondary,
                                fresh_handle=not (swarm or named))
        except calico_ipam.AddressInUse:
            attributes = self.ipam.attributes_of(ip)
            if named and attributes is not None and attributes.get("handle_id") == handle:
                log.info("address %s is already %s's (pool %s)", ip, handle, req.pool_id)
                return p.RequestAddressResponse(f"{ip}/{plen}")
            if swarm or not is_swarm_allocation(attributes):
                raise
            log.info("address %s was assigned by the swarm manager (pool %s)", ip, req.pool_id)
            return p.RequestAddressResponse(f"{ip}/{plen}")
        log.info("assigned requested address %s on host %s (pool %s)", ip, host, req.pool_id)
        return p.RequestAddressResponse(f"{ip}/{plen}")

    def release_address(self, req: p.ReleaseAddressRequest) -> None:
        ip = ipaddress.ip_address(req.address)
        if str(ip) in MARKER_RELEASES:
            return None           # the marker gateway: never allocated
        version = parse_pool_id(req.pool_id)[0]
        if ip.version != version:
            raise InvalidRequest(f"address {ip} is not an IPv{version} address "
                                 f"(pool {req.pool_id})")
        swarm = split_pool_id(req.pool_id)[0] is not None
        # Only what this PoolID handed out is freed (checked on the block
        # version that is changed); a node's release of what its swarm
        # manager allocated frees nothing: the manager releases it (once)
        # when the task or network goes.
        not_allocated, kept = self.ipam.release_ips_keeping(
            [ip], keep=lambda attributes: not handed_out_by(req.pool_id, attributes, ip))
        if not_allocated:
            raise NotAllocated(f"address {ip} is not allocated (pool {req.pool_id}): "
                               f"nothing released")
        if kept:
            attributes = self.ipam.attributes_of(ip)
            if not swarm and is_swarm_allocation(attributes):
                log.info("left %s to the swarm manager that allocated it (pool %s)", ip,
                         req.pool_id)
                return None
            if attributes is None:      # freed meanwhile by its owner
                raise NotAllocated(f"address {ip} is not allocated (pool {req.pool_id}): "
                                   f"nothing released")
            raise NotOwner(f"address {ip} was not handed out by pool {req.pool_id}: "
                           f"not released")
        log.info("released %s (pool %s)", ip, req.pool_id)
        return None
