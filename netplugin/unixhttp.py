"""HTTP over a unix socket, the way dockerd talks to a plugin: for tools and
tests that call the plugin's socket (``netpluginctl status``, the test suite)."""
from __future__ import annotations

import http.client
import socket
from typing import Dict, Optional, Tuple


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client.HTTPConnection`` to the unix socket ``path``."""

    def __init__(self, path: str, timeout: float = 30):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def request(method: str, sock_path: str, path: str, body: Optional[bytes] = None,
            timeout: float = 30, headers: Optional[Dict[str, str]] = None
            ) -> Tuple[int, bytes]:
    """One HTTP request on the socket; return (HTTP status, response body)."""
    conn = UnixHTTPConnection(sock_path, timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post(sock_path: str, path: str, body: bytes = b"", timeout: float = 30,
         headers: Optional[Dict[str, str]] = None) -> Tuple[int, bytes]:
    """POST ``body`` to ``path`` on the socket (no Content-Type unless given,
    as dockerd does); return (HTTP status, response body)."""
    return request("POST", sock_path, path, body, timeout, headers)


def get(sock_path: str, path: str, timeout: float = 30) -> Tuple[int, bytes]:
    return request("GET", sock_path, path, None, timeout)
