"""netplugin: Docker libnetwork remote driver front-end with pluggable backends.
Owns the version string only; the front-end's rooms are its modules.
"""

__version__ = "0.1.0"
