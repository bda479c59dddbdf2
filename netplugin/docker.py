"""The one Docker Engine API client of the plugin and its tools: docker-py's
``APIClient`` on an endpoint, the API version negotiated, and ``DockerUnavailable``.

``DockerClient(endpoint, timeout)`` connects on its first call, not when it is
made (dockerd may still be starting; importing docker-py is slow), and asks
dockerd for the API version to speak (``GET /version``, which takes no lock),
so every dockerd from 20.10 (API 1.41) to the newest one is spoken to in its
own version.  Every failure (refused, timed out, HTTP error, no JSON) is one
``DockerUnavailable`` whose message names the endpoint and the cause; after
one, the next call starts on a fresh connection pool.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from netplugin.errors import PluginError

#: Seconds of one request when the caller names none.
DEFAULT_TIMEOUT = 5.0
#: What ``APIClient(version=...)`` is given: negotiate with dockerd.
API_VERSION = "auto"

_RAISE = object()


class DockerUnavailable(PluginError):
    """Docker could not be asked (in time), or its answer made no sense."""


def reason(exc: BaseException) -> str:
    """One short line for a docker-py / requests exception."""
    text = str(exc) or type(exc).__name__
    if "timed out" in text.lower():
        return "timed out"
    return text.splitlines()[0][:300]


def _default_factory(base_url: str, version: str, timeout: float):
    import docker  # noqa: PLC0415 - heavy import, only when used
    return docker.APIClient(base_url=base_url, version=version, timeout=timeout)


class DockerClient:
    """Docker at ``endpoint`` (``unix:///run/docker.sock``, ``tcp://h:2375``).

    ``factory(base_url, version, timeout)`` builds the docker-py client (tests
    inject fakes); it is called once, on first use, and again after a failure.
    Thread-safe: calls share one client."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT,
                 factory: Optional[Callable[[str, str, float], Any]] = None):
        self.endpoint = endpoint
        self.timeout = timeout
        self._factory = factory or _default_factory
        self._client = None
        self._lock = threading.Lock()

    @property
    def api(self):
        """The docker-py ``APIClient`` (connected, version negotiated);
        DockerUnavailable when dockerd does not answer."""
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._factory(self.endpoint, API_VERSION, self.timeout)
                except Exception as exc:  # noqa: BLE001 - any transport error
                    raise DockerUnavailable(f"cannot reach Docker at {self.endpoint}: "
                                            f"{reason(exc)}") from None
            return self._client

    def call(self, what: str, fn: Callable[[Any], Any], not_found: Any = _RAISE) -> Any:
        """``fn(api)``; DockerUnavailable naming ``what`` when it fails, or
        ``not_found`` when given and Docker answered 404."""
        client = self.api
        try:
            return fn(client)
        except DockerUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - refused, timeout, HTTP error, bad JSON
            if not_found is not _RAISE and _is_not_found(exc):
                return not_found
            self._drop(client)
            raise DockerUnavailable(f"Docker at {self.endpoint}: {what} failed: "
                                    f"{reason(exc)}") from None

    def ping(self) -> None:
        """``GET /_ping``; DockerUnavailable unless dockerd answers OK."""
        self.call("ping", lambda api: api.ping())

    def network(self, name_or_id: str) -> Optional[dict]:
        """``GET /networks/<name or ID>``: the network, None when Docker has
        none of that name or ID."""
        found = self.call(f"inspect network {name_or_id[:12]}",
                          lambda api: api.inspect_network(name_or_id), not_found=None)
        if found is not None and not isinstance(found, dict):
            raise DockerUnavailable(f"Docker at {self.endpoint}: unexpected answer to "
                                    f"inspect network {name_or_id[:12]}: {found!r:.200}")
        return found

    def _drop(self, client) -> None:
        with self._lock:  # a broken connection pool: start afresh next time
            if self._client is client:
                self._client = None
        _close(client)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            _close(client)

    def __enter__(self) -> "DockerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_not_found(exc: BaseException) -> bool:
    try:
        from docker.errors import NotFound  # noqa: PLC0415
    except ImportError:  # pragma: no cover - a dependency of the project
        return False
    return isinstance(exc, NotFound)


def _close(client) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - best effort
        pass
