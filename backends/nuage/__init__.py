"""The Nuage backend: containers as vPorts of the local Nuage VRS (OVSDB via
python-ovs), Docker's IPAM for addresses.  See ``backends/nuage/driver.py``
and docs/nuage.md.

Importing this package registers ``NuageBackend`` as ``"nuage"``.
"""
from backends.nuage.driver import NuageBackend  # noqa: F401  (registers "nuage")
