"""Exceptions shared by the front-end, the datastores and the backends.
Owns the error classes and which HTTP answer each becomes; raised everywhere, defined here only.

Every exception that reaches the Flask app as a ``PluginError`` is answered to
Docker as HTTP 500 ``{"Err": str(exc), "Error": str(exc)}``.
"""


class PluginError(Exception):
    """An error whose message is meant for the Docker user."""


class InvalidRequest(PluginError):
    """The request from Docker is malformed or has wrong types/values."""


class NotFound(PluginError):
    """A network, endpoint, pool or address the request names is unknown."""


class Conflict(PluginError):
    """The request clashes with existing state (address taken, already exists)."""


class BodyTooLarge(InvalidRequest):
    """The request body is over the plugin's limit (answered HTTP 413)."""


class NotSupported(PluginError):
    """The backend does not offer this call or option."""


class ConfigError(Exception):
    """The configuration file is missing or invalid (one clear line for the operator)."""
