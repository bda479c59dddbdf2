"""The Calico data model of the plugin: every datastore record it reads or writes
(Endpoint, Profile, NetworkRecord, Pool, Block, Handle, IpamConfig), its JSON and its key.

Everything is imported from here (``from backends.calico.model import ...``);
the submodules are: common (key roots, keys, veth names), endpoints, profiles
(with the rules), networks, ipam.

One place for each key root and key function, the ``cali`` + 11 characters
interface names, and what a valid profile rule is (``parse_rule``,
``validate_rules``).  Records written by the plugin are built here and come
out byte for byte as Calico's v1 / IPAM v2 layout (and the plugin's own
``/calico/libnetwork`` keys) has them; records read from a datastore are
parsed leniently where a reader must survive other writers: ``from_json``
raises ``CorruptRecord`` (a ValueError) only for what no reader can use, and
the stricter checks of one reader are methods (``Endpoint.policy_problem``,
``Endpoint.check_join``, ``Endpoint.host_routes``).

``<nid>`` is Docker's NetworkID (a per-host ID on Docker >= 23), ``<eid>`` the
EndpointID, ``<host>`` the Calico host name (``[calico] hostname``).
"""
from __future__ import annotations

from backends.calico.model.common import (
    AFFINITY_ROOT, BLOCK_ROOT, FIXED_MAC, HANDLE_ROOT, HOST_DEVICE_RE, HOST_PREFIX,
    HOST_ROOT, ID_CHARS, IPAM_CONFIG_KEY, IPAM_ROOT, MAC_RE, MAX_ID_LEN, NETWORK_ROOT,
    ORCHESTRATOR, POOL_ROOT, PROFILE_REF_ROOT, PROFILE_ROOT, REMOVED_ROOT, TEMP_DEVICE_RE,
    TEMP_PREFIX, VALID_ID_RE, VETH_MARKER_PREFIX, WORKLOAD, bird6_ip_key, bird_ip_key,
    block_dir, block_key, cidr_from_key, cidr_in_key, CorruptRecord, endpoint,
    endpoint_dir, endpoint_key, handle_key, host_affinity_dir, host_affinity_key,
    host_veth_name, host_workloads, IPAddress, IPNetwork, is_endpoint_key, is_our_veth,
    network, network_key, parse_affinity_key, parse_bird_ip_key, parse_endpoint_key,
    parse_profile_key, pool, pool_dir, pool_key, profile_dir, profile_labels, profile_ref,
    profile_ref_json, profile_refs, profile_rules, profile_tags, removed_key,
    temp_veth_name, truthy, tunnel_address_host, valid_id, veth_marker)
from backends.calico.model.endpoints import (
    Endpoint, parse_endpoints)
from backends.calico.model.profiles import (
    ALLOW_ACTIONS, MATCH_KEYS, PORT_PROTOCOLS, PROTOCOLS, RULE_DIRECTIONS, RULE_KEYS,
    InvalidRule, parse_profiles, parse_rule, Profile, Rule, rule_action, validate_rules)
from backends.calico.model.networks import (
    ADDRESS_SPACES, CALICO_IPAM_GATEWAYS, GATEWAY_MARKER, GLOBAL_ADDRESS_SPACE,
    LOCAL_ADDRESS_SPACE, META, is_calico_ipam, NetworkRecord)
from backends.calico.model.ipam import (
    BLOCK_PREFIXLEN, BLOCK_SIZE, BLOCK_SIZE_BITS, IPAM_HANDLE_PREFIX, AddressInUse, Block,
    block_cidr_for, CorruptData, Handle, IpamConfig, IpamError, is_our_ipam_handle, Pool)

__all__ = [
    "ADDRESS_SPACES", "AFFINITY_ROOT", "ALLOW_ACTIONS", "AddressInUse", "BLOCK_PREFIXLEN",
    "BLOCK_ROOT", "BLOCK_SIZE", "BLOCK_SIZE_BITS", "Block", "CALICO_IPAM_GATEWAYS",
    "CorruptData", "CorruptRecord", "Endpoint", "FIXED_MAC", "GATEWAY_MARKER",
    "GLOBAL_ADDRESS_SPACE", "HANDLE_ROOT", "HOST_DEVICE_RE", "HOST_PREFIX", "HOST_ROOT",
    "Handle", "ID_CHARS", "IPAM_CONFIG_KEY", "IPAM_HANDLE_PREFIX", "IPAM_ROOT",
    "IPAddress", "IPNetwork", "InvalidRule", "IpamConfig", "IpamError",
    "LOCAL_ADDRESS_SPACE", "MAC_RE", "MATCH_KEYS", "MAX_ID_LEN", "META", "NETWORK_ROOT",
    "NetworkRecord", "ORCHESTRATOR", "POOL_ROOT", "PORT_PROTOCOLS", "PROFILE_REF_ROOT",
    "PROFILE_ROOT", "PROTOCOLS", "Pool", "Profile", "REMOVED_ROOT", "RULE_DIRECTIONS",
    "RULE_KEYS", "Rule", "TEMP_DEVICE_RE", "TEMP_PREFIX", "VALID_ID_RE",
    "VETH_MARKER_PREFIX", "WORKLOAD", "bird6_ip_key", "bird_ip_key", "block_cidr_for",
    "block_dir", "block_key", "cidr_from_key", "cidr_in_key", "endpoint", "endpoint_dir",
    "endpoint_key", "handle_key", "host_affinity_dir", "host_affinity_key",
    "host_veth_name", "host_workloads", "is_calico_ipam", "is_endpoint_key",
    "is_our_ipam_handle", "is_our_veth", "network", "network_key", "parse_affinity_key",
    "parse_bird_ip_key", "parse_endpoint_key", "parse_endpoints", "parse_profile_key",
    "parse_profiles", "parse_rule", "pool", "pool_dir", "pool_key", "profile_dir",
    "profile_labels", "profile_ref", "profile_ref_json", "profile_refs", "profile_rules",
    "profile_tags", "removed_key", "rule_action", "temp_veth_name", "truthy",
    "tunnel_address_host", "valid_id", "validate_rules", "veth_marker"]
