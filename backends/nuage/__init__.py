"""The Nuage backend: containers as vPorts of the local Nuage VRS (OVSDB via
python-ovs), Docker's IPAM for addresses.  See ``backends/nuage/driver.py``
and docs/nuage.md.

``backends.nuage.config`` parses the ``[nuage]`` table; importing
``backends.nuage.driver`` registers ``NuageBackend`` as ``"nuage"``.
"""
