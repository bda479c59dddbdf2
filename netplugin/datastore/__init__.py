"""Datastore adapters: embedded (sqlite file), etcd (v2 API), etcdv3 (v3 API), consul.
Owns the adapter table (type name -> class) and open_datastore; the interface is base.py.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from netplugin.datastore.base import (  # noqa: F401  (re-exported)
    CompareFailed, Datastore, DatastoreError, DatastoreMisconfigured, DatastoreUnavailable,
    Event, Item, KEEP, KeyExists, KeyNotFound, TooMuchContention, Watch, normalize_prefix,
    watching)
from netplugin.datastore.counting import CountingDatastore  # noqa: F401

__all__ = ["ADAPTERS", "CompareFailed", "CountingDatastore", "Datastore", "DatastoreError",
           "DatastoreMisconfigured", "DatastoreUnavailable", "Event", "Item", "KeyExists",
           "KEEP", "KeyNotFound", "TooMuchContention", "Watch", "normalize_prefix", "open_datastore", "watching"]

if TYPE_CHECKING:  # pragma: no cover
    from netplugin.config import DatastoreConfig

# type name in the config -> (module, class)
ADAPTERS = {
    "embedded": ("netplugin.datastore.embedded", "EmbeddedDatastore"),
    "etcd": ("netplugin.datastore.etcd", "EtcdDatastore"),
    "etcdv3": ("netplugin.datastore.etcdv3", "Etcd3Datastore"),
    "consul": ("netplugin.datastore.consul", "ConsulDatastore"),
}


def open_datastore(cfg: "DatastoreConfig") -> Datastore:
    """Build the adapter the ``[datastore]`` section asks for."""
    module_name, class_name = ADAPTERS[cfg.type]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.from_config(cfg)
