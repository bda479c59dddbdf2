"""netplugin: Docker libnetwork remote driver front-end with pluggable backends."""

__version__ = "0.1.0"
