"""Backends: one package per backend (``backends.calico``, ``backends.nuage``).

Importing a backend package registers its class with ``netplugin.backend``.
"""
