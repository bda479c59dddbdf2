"""Backends: one package per backend (``backends.calico``, ``backends.nuage``).
Owns nothing but the namespace: each backend's config, driver and agents live in its package.

A backend package imports nothing itself, so that reading the config loads
no backend: ``backends.<name>.config`` parses its ``[<name>]`` table (found
by name by ``netplugin.config``), and importing ``backends.<name>.driver``
(``netplugin.backend.load_backend`` does) registers its class.
"""
