"""The Calico backend: Calico v1 etcd data model, routed veths, no bridge.

Importing this package registers ``CalicoBackend`` as ``"calico"``.
"""
from backends.calico.driver import CalicoBackend  # noqa: F401  (registers "calico")
