"""The reading of a TOML config file, shared by the front-end's config and each backend's.
Owns: TOML decoding and the typed table Reader whose errors name file, key, value; no keys.

Every user error raises ``ConfigError`` with one line naming the file, the key
and the value.  ``netplugin.config`` reads the front-end's keys with it; a
backend's ``backends/<name>/config.py`` reads its own ``[<name>]`` table.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Any, Dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from netplugin.errors import ConfigError


class Reader:
    """Typed access to one TOML table, with errors naming file and key."""

    def __init__(self, path: str, table: Dict[str, Any], section: str = ""):
        self.path = path
        self.table = dict(table)
        self.section = section

    def _name(self, key: str) -> str:
        return f"{self.section}.{key}" if self.section else key

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: key '{self._name(key)}' {msg}")

    def pop(self, key: str, kind, default, choices=None, lower=False):
        if key not in self.table:
            return default
        value = self.table.pop(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(key, f"must be a list of strings, got {value!r}")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(key, f"must be {_kind_name(kind)}, got {value!r}")
        if lower:
            value = value.lower()
        if choices is not None and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def table_of(self, key: str) -> "Reader":
        value = self.table.pop(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table ([{key}]), got {value!r}")
        return Reader(self.path, value, self._name(key))

    def finish(self) -> None:
        for key, value in self.table.items():
            raise self.fail(key, f"is unknown (value {value!r})")


def _kind_name(kind) -> str:
    return {str: "a string", int: "an integer", float: "a number",
            bool: "a boolean", list: "a list"}.get(kind, kind.__name__)


def default_hostname() -> str:
    """Calico's rule: $HOSTNAME, else the kernel's host name."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


def read_file(path: str) -> Dict[str, Any]:
    """The decoded TOML document at ``path``; ``ConfigError`` on any user error."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def read_text(text: str, path: str = "<string>") -> Dict[str, Any]:
    """The decoded TOML ``text`` (tests and tools)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
