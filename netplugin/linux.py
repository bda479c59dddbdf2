"""Small Linux networking helpers (pyroute2 and /proc/sys) for backends.
Owns every netlink and sysctl call of the backends (veths, addresses, routes, link dumps).

Every function works in the current network namespace, opens its own netlink
socket, does one thing and is idempotent where that makes sense (deleting an
absent link succeeds, replacing a route twice is fine...).  Netlink and
/proc/sys failures are raised as ``PluginError`` with a message naming the
operation and the kernel's reason, e.g. ``cannot create veth cali1234: File
exists``.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netplugin.errors import InvalidRequest, PluginError

log = logging.getLogger(__name__)

PROC_SYS = "/proc/sys"
IFNAMSIZ = 15  # longest interface name Linux accepts
IFA_F_NODAD = 0x02  # linux/if_addr.h


# --------------------------------------------------------------------------
# internals


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        code = getattr(exc, "code", None)
        if len(exc.args) > 1 and exc.args[1]:
            return str(exc.args[1])
        if code:
            return os.strerror(code)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def _netlink(what: str) -> Iterator[IPRoute]:
    """Open an ``IPRoute`` on the current netns; turn failures into PluginError."""
    try:
        ipr = IPRoute()
    except (NetlinkError, OSError) as exc:
        raise PluginError(f"cannot {what}: cannot open netlink socket: {_reason(exc)}") from exc
    try:
        yield ipr
    except (NetlinkError, OSError) as exc:
        raise PluginError(f"cannot {what}: {_reason(exc)}") from exc
    finally:
        ipr.close()


def _check_ifname(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > IFNAMSIZ \
            or "/" in name or name in (".", "..") or any(c.isspace() for c in name):
        raise InvalidRequest(f"invalid interface name {name!r} (1-{IFNAMSIZ} characters, "
                             "no '/' or spaces)")
    return name


def _index(ipr: IPRoute, name: str) -> Optional[int]:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _require_index(ipr: IPRoute, name: str) -> int:
    idx = _index(ipr, name)
    if idx is None:
        raise NetlinkError(errno.ENODEV, f"no such interface {name}")
    return idx


# --------------------------------------------------------------------------
# links


def link_exists(name: str) -> bool:
    """True if an interface called ``name`` exists in the current netns."""
    _check_ifname(name)
    with _netlink(f"look up link {name}") as ipr:
        return _index(ipr, name) is not None


def link_info(name: str) -> Optional[Dict[str, object]]:
    """``{"name", "index", "mtu", "mac", "up", "operstate", "kind"}`` or None if absent."""
    _check_ifname(name)
    with _netlink(f"look up link {name}") as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return None
        msg = ipr.get_links(idx)[0]
        linkinfo = msg.get("IFLA_LINKINFO")
        kind = linkinfo.get("IFLA_INFO_KIND") if linkinfo else None
        return {"name": msg.get("IFLA_IFNAME"), "index": idx,
                "mtu": msg.get("IFLA_MTU"), "mac": msg.get("IFLA_ADDRESS"),
                "up": bool(msg["flags"] & 1), "operstate": msg.get("IFLA_OPERSTATE"),
                "kind": kind}


@dataclass(frozen=True)
class Link:
    """What the agents need of one interface (``list_links``)."""
    name: str
    index: int
    kind: Optional[str] = None             # IFLA_INFO_KIND ("veth", ...)
    peer_index: Optional[int] = None       # IFLA_LINK
    peer_netnsid: Optional[int] = None     # IFLA_LINK_NETNSID: >= 0 when the peer is elsewhere
    alias: Optional[str] = None            # IFLA_IFALIAS


_NLMSG = struct.Struct("=IHHII")           # len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")         # family, type, index, flags, change
_RTA = struct.Struct("=HH")                # len, type
_RTM_GETLINK, _RTM_NEWLINK, _NLMSG_DONE, _NLMSG_ERROR = 18, 16, 3, 2
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_IFLA_IFNAME, _IFLA_LINK, _IFLA_LINKINFO, _IFLA_IFALIAS = 3, 5, 18, 20
_IFLA_LINK_NETNSID, _IFLA_INFO_KIND, _IFLA_EXT_MASK = 37, 1, 29


def _attrs(data: bytes, start: int, end: int) -> Iterator[tuple]:
    while start + 4 <= end:
        length, kind = _RTA.unpack_from(data, start)
        if length < 4:
            return
        yield kind & 0x3FFF, start + 4, start + length
        start += (length + 3) & ~3


def _cstr(data: bytes, start: int, end: int) -> str:
    return data[start:end].split(b"\0", 1)[0].decode("utf-8", "replace")


def list_links(prefixes: tuple = ()) -> List[Link]:
    """The interfaces of the current netns whose name starts with one of
    ``prefixes`` (all when empty): one RTM_GETLINK dump read with a minimal
    parser, since the agents list the links every second and pyroute2's full
    decoding of hundreds of veths costs tens of milliseconds and megabytes."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         socket.NETLINK_ROUTE)
    out: List[Link] = []
    try:
        sock.settimeout(10)
        sock.bind((0, 0))
        body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        ext = _RTA.pack(8, _IFLA_EXT_MASK) + struct.pack("=I", 0)
        sock.send(_NLMSG.pack(_NLMSG.size + len(body) + len(ext), _RTM_GETLINK,
                              _NLM_F_REQUEST_DUMP, 1, 0) + body + ext)
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    raise PluginError("cannot list links: malformed netlink answer")
                if mtype == _NLMSG_DONE:
                    return out
                if mtype == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + _NLMSG.size)[0]
                    raise PluginError(f"cannot list links: {os.strerror(code)}")
                if mtype == _RTM_NEWLINK:
                    link = _parse_link(data, offset + _NLMSG.size, offset + length)
                    if link is not None and (not prefixes or link.name.startswith(prefixes)):
                        out.append(link)
                offset += (length + 3) & ~3
    except OSError as exc:
        raise PluginError(f"cannot list links: {_reason(exc)}") from exc
    finally:
        sock.close()


def _parse_link(data: bytes, start: int, end: int) -> Optional[Link]:
    _family, _type, index, _flags, _change = _IFINFO.unpack_from(data, start)
    fields: Dict[str, object] = {}
    for kind, a, b in _attrs(data, start + _IFINFO.size, end):
        if kind == _IFLA_IFNAME:
            fields["name"] = _cstr(data, a, b)
        elif kind == _IFLA_LINK and b - a >= 4:
            fields["peer_index"] = struct.unpack_from("=I", data, a)[0]
        elif kind == _IFLA_LINK_NETNSID and b - a >= 4:
            fields["peer_netnsid"] = struct.unpack_from("=i", data, a)[0]
        elif kind == _IFLA_IFALIAS:
            fields["alias"] = _cstr(data, a, b) or None
        elif kind == _IFLA_LINKINFO:
            for sub, c, d in _attrs(data, a, b):
                if sub == _IFLA_INFO_KIND:
                    fields["kind"] = _cstr(data, c, d)
    if "name" not in fields:
        return None
    return Link(index=index, **fields)


def delete_link(name: str) -> bool:
    """Delete interface ``name``; return False (no error) if it does not exist.

    Deleting one end of a veth pair deletes the other end too, and routes
    through the link go with it."""
    _check_ifname(name)
    with _netlink(f"delete link {name}") as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:  # vanished meanwhile
                return False
            raise
        return True


def create_veth(name: str, peer: str, mtu: Optional[int] = None,
                peer_mac: Optional[str] = None, alias: Optional[str] = None) -> None:
    """Create the veth pair ``name`` <-> ``peer``, both ends down.

    An existing interface called ``name`` (e.g. left by an earlier attempt) is
    deleted first, which also removes its old peer.  An unrelated interface
    already called ``peer`` is left alone and makes this fail ("File exists").
    ``mtu`` applies to both ends; ``peer_mac`` sets the peer's MAC address;
    ``alias`` (IFLA_IFALIAS, ``ip link show`` prints it) marks ``name`` as
    ours, so that a cleanup never touches an interface it did not create."""
    _check_ifname(name)
    _check_ifname(peer)
    if name == peer:
        raise InvalidRequest(f"veth ends must have different names, got {name!r} twice")
    if delete_link(name):
        log.info("deleted stale interface %s before re-creating it", name)
    peer_spec: Dict[str, object] = {"ifname": peer}
    attrs: Dict[str, object] = {}
    if mtu is not None:
        peer_spec["mtu"] = int(mtu)
        attrs["mtu"] = int(mtu)
    if peer_mac:
        peer_spec["address"] = peer_mac.lower()
    with _netlink(f"create veth {name}") as ipr:
        ipr.link("add", ifname=name, kind="veth", peer=peer_spec, **attrs)
        if alias:
            try:
                ipr.link("set", index=_require_index(ipr, name), ifalias=alias)
            except (NetlinkError, OSError):
                ipr.link("del", index=_require_index(ipr, name))   # no unmarked veth
                raise


def link_alias(name: str) -> Optional[str]:
    """The IFLA_IFALIAS of interface ``name`` (None: no alias or no interface)."""
    _check_ifname(name)
    with _netlink(f"read link {name}") as ipr:
        links = ipr.link_lookup(ifname=name)
        if not links:
            return None
        return ipr.get_links(links[0])[0].get("IFLA_IFALIAS") or None


def set_link_up(name: str) -> None:
    """Set interface ``name`` administratively up (no-op if already up)."""
    _check_ifname(name)
    with _netlink(f"set link {name} up") as ipr:
        ipr.link("set", index=_require_index(ipr, name), state="up")


# --------------------------------------------------------------------------
# addresses and routes


def _host_network(address: str) -> ipaddress._BaseNetwork:
    """``10.0.0.5``, ``10.0.0.5/24`` or ``fd00::5/64`` -> the /32 or /128 network."""
    try:
        ip = ipaddress.ip_interface(address).ip
    except ValueError:
        raise InvalidRequest(f"not an IP address: {address!r}") from None
    return ipaddress.ip_network(ip)


def _family(net) -> int:
    return socket.AF_INET if net.version == 4 else socket.AF_INET6


def replace_host_route(address: str, ifname: str) -> None:
    """``ip route replace <address>/32 (or /128) dev <ifname> scope link``.

    Any prefix on ``address`` is ignored: the route is for that one address.
    The link must be up for IPv6 routes (the kernel says "Network is down")."""
    _check_ifname(ifname)
    net = _host_network(address)
    with _netlink(f"add route {net} dev {ifname}") as ipr:
        idx = _require_index(ipr, ifname)
        ipr.route("replace", dst=str(net.network_address), dst_len=net.prefixlen,
                  family=_family(net), oif=idx, scope="link")


def delete_host_route(address: str, ifname: str) -> bool:
    """Delete the host route to ``address`` via ``ifname``; False if there was none."""
    _check_ifname(ifname)
    net = _host_network(address)
    with _netlink(f"delete route {net} dev {ifname}") as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return False
        try:
            ipr.route("del", dst=str(net.network_address), dst_len=net.prefixlen,
                      family=_family(net), oif=idx)
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENOENT):
                return False
            raise
        return True


def list_routes(ifname: str) -> List[str]:
    """The destinations (``cidr``) of the IPv4 and IPv6 routes through ``ifname``
    in the main table, excluding the kernel's own link-local/multicast ones."""
    _check_ifname(ifname)
    with _netlink(f"list routes of {ifname}") as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return []
        out = []
        for r in ipr.get_routes(oif=idx, table=254):
            dst = r.get("RTA_DST")
            if dst is None:
                dst = "0.0.0.0" if r["family"] == socket.AF_INET else "::"
            net = f"{dst}/{r['dst_len']}"
            if net.startswith(("fe80:", "ff00:")):
                continue
            out.append(net)
        return out


def add_address(ifname: str, cidr: str, nodad: bool = False) -> None:
    """Add ``cidr`` (``ip/prefix``) to ``ifname``; already present is fine.

    ``nodad`` skips IPv6 duplicate address detection, so the address is usable
    at once (e.g. a link-local gateway ``fe80::1/64``)."""
    _check_ifname(ifname)
    try:
        iface = ipaddress.ip_interface(cidr)
    except ValueError:
        raise InvalidRequest(f"not an ip/prefix: {cidr!r}") from None
    kwargs: Dict[str, object] = {}
    if nodad:
        kwargs["flags"] = IFA_F_NODAD
    with _netlink(f"add address {cidr} to {ifname}") as ipr:
        idx = _require_index(ipr, ifname)
        try:
            ipr.addr("add", index=idx, address=str(iface.ip),
                     prefixlen=iface.network.prefixlen, **kwargs)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise


def list_addresses(ifname: str) -> List[str]:
    """Every address on ``ifname`` as ``ip/prefix`` ([] if the link is absent)."""
    _check_ifname(ifname)
    with _netlink(f"list addresses of {ifname}") as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return []
        return [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx)]


# --------------------------------------------------------------------------
# sysctls


def _sysctl_path(name: str) -> str:
    rel = name.strip("/")
    if rel.startswith("proc/sys/"):
        rel = rel[len("proc/sys/"):]
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise InvalidRequest(f"invalid sysctl name {name!r}")
    return os.path.join(PROC_SYS, *parts)


def read_sysctl(name: str) -> str:
    """Value of ``/proc/sys/<name>`` (e.g. ``net/ipv4/ip_forward``), stripped."""
    path = _sysctl_path(name)
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise PluginError(f"cannot read sysctl {name}: {_reason(exc)}") from exc


def write_sysctl(name: str, value) -> None:
    """Write ``value`` to ``/proc/sys/<name>``, e.g.
    ``write_sysctl("net/ipv4/conf/cali123/proxy_arp", 1)``."""
    path = _sysctl_path(name)
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
    except OSError as exc:
        raise PluginError(f"cannot set sysctl {name}={value}: {_reason(exc)}") from exc


def ensure_sysctl(name: str, value) -> bool:
    """Write ``value`` unless the sysctl already has it; return True if written.

    Reading first keeps a read-only /proc/sys from failing when nothing needs
    changing."""
    try:
        if read_sysctl(name) == str(value):
            return False
    except PluginError:
        pass  # let the write report the problem
    write_sysctl(name, value)
    return True


def ipv6_available() -> bool:
    """True if the kernel has IPv6 (``/proc/sys/net/ipv6`` exists)."""
    return os.path.isdir(os.path.join(PROC_SYS, "net", "ipv6"))


# --------------------------------------------------------------------------
# IPv6 proxy neighbour entries (`ip -6 neigh add proxy ADDR dev IF`)


def add_proxy_neighbour(address: str, ifname: str) -> None:
    """Answer neighbour solicitations for ``address`` on ``ifname`` (the link
    also needs ``net/ipv6/conf/IF/proxy_ndp = 1``).  Idempotent."""
    from pyroute2.netlink.rtnl.ndmsg import NTF_PROXY

    _check_ifname(ifname)
    with _netlink(f"add proxy neighbour {address} dev {ifname}") as ipr:
        idx = _require_index(ipr, ifname)
        ipr.neigh("replace", dst=address, ifindex=idx, family=socket.AF_INET6,
                  flags=NTF_PROXY)


def delete_proxy_neighbour(address: str, ifname: str) -> bool:
    """Remove a proxy entry; False if the link or the entry is gone."""
    from pyroute2.netlink.rtnl.ndmsg import NTF_PROXY

    _check_ifname(ifname)
    with _netlink(f"delete proxy neighbour {address} dev {ifname}") as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return False
        try:
            ipr.neigh("del", dst=address, ifindex=idx, family=socket.AF_INET6,
                      flags=NTF_PROXY)
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ESRCH):
                return False
            raise
    return True


def list_proxy_neighbours() -> List[tuple]:
    """``(ifname, address)`` of every IPv6 proxy neighbour entry.  pyroute2's
    dump cannot ask the kernel for proxy entries (NTF_PROXY in the request
    header), so this one reads ``ip -j -6 neigh show proxy``."""
    import json
    import subprocess

    try:
        out = subprocess.run(["ip", "-j", "-6", "neigh", "show", "proxy"], check=True,
                             capture_output=True, text=True, timeout=10).stdout
        entries = json.loads(out or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise PluginError(f"cannot list proxy neighbours: {exc}") from exc
    return [(e["dev"], e["dst"]) for e in entries if "dev" in e and "dst" in e]
