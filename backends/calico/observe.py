"""What the Calico backend adds to ``/health`` and ``/metrics``: Docker's
reachability, and gauges read from the datastore at scrape time.

The gauges: endpoints per host, networks, allocated and free addresses per
Calico IPAM pool."""
from __future__ import annotations

import ipaddress
from typing import Dict, Iterable, Tuple

from prometheus_client.core import GaugeMetricFamily

from netplugin import health

from backends.calico import model
from backends.calico.ipam import CalicoIpam


def health_checks(backend) -> Dict[str, Tuple[bool, str]]:
    cfg = backend.config.calico
    return {"docker": health.check_docker(cfg.docker_endpoint, min(cfg.docker_timeout, 3.0))}


def collect(backend) -> Iterable:
    """Gauges of the datastore's Calico state (one list per prefix)."""
    store, host = backend.datastore, backend.config.calico.hostname
    endpoints = GaugeMetricFamily("netplugin_endpoints", "Calico endpoints by host", labels=["host"])
    per_host: Dict[str, int] = {}
    for item in store.list_prefix(model.HOST_ROOT):
        parsed = model.parse_endpoint_key(item.key)
        if parsed is not None:
            per_host[parsed[0]] = per_host.get(parsed[0], 0) + 1
    per_host.setdefault(host, 0)
    for name, count in sorted(per_host.items()):
        endpoints.add_metric([name], count)
    yield endpoints

    networks = GaugeMetricFamily("netplugin_networks", "Calico networks known to the plugin")
    networks.add_metric([], len(store.list_prefix(model.NETWORK_ROOT)))
    yield networks

    pools = GaugeMetricFamily("netplugin_pool_addresses",
                              "Addresses of each Calico IPAM pool by state",
                              labels=["pool", "state"])
    ipam = CalicoIpam(store)
    for version in (4, 6):
        pool_list = [pl for pl in ipam.pools(version) if pl.ipam]
        if not pool_list:
            continue
        used = {pl.cidr: 0 for pl in pool_list}
        for item in store.list_prefix(model.block_dir(version)):
            try:
                block = model.Block.from_json(item.key, item.value, item.version)
            except Exception:   # a corrupt block is the audit's business, not a scrape's
                continue
            for pl in pool_list:
                if block.cidr.subnet_of(pl.cidr):
                    used[pl.cidr] += len(block.allocated())
                    break
        for cidr, count in used.items():
            pools.add_metric([str(cidr), "allocated"], count)
            pools.add_metric([str(cidr), "free"], ipaddress.ip_network(cidr).num_addresses - count)
    yield pools
