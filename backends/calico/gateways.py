"""One IPv4 gateway per Calico interface of a container.
Owns the host-local sandbox table: the gateway of each endpoint, the endpoints of a container.

Every Calico interface reaches the host through a link-local next hop that
nothing owns (proxy ARP answers).  Docker adds the connected route to it on
the interface; two interfaces of one container with the same next hop make
Docker fail with "file exists" (the old plugin's calicoctl#1031), so the first
Calico endpoint of a sandbox gets 169.254.1.1, the next 169.254.1.2, and so on.

Which gateway each endpoint of a sandbox holds is kept host-locally (a
directory per sandbox under the state dir, a file per endpoint; an IPv6-only
endpoint has an empty file): it lives exactly as long as the containers on
this host, so a tmpfs like /run fits.  The policy agent reads it too
(``sandboxes``): endpoints of one sandbox are one container.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import ipaddress
import os
from contextlib import contextmanager
from typing import Callable, Dict, Iterator

FIRST = ipaddress.IPv4Address("169.254.1.1")
LAST = ipaddress.IPv4Address("169.254.1.254")


class GatewayTable:
    """``choose`` a gateway for an endpoint in a sandbox; ``release`` it."""

    def __init__(self, state_dir: str):
        self.root = os.path.join(state_dir, "sandboxes")

    def _dir(self, sandbox_key: str) -> str:
        digest = hashlib.sha1(sandbox_key.encode()).hexdigest()[:20]
        return os.path.join(self.root, digest)

    @contextmanager
    def _locked(self, path: str) -> Iterator[None]:
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def choose(self, sandbox_key: str, endpoint_id: str,
               alive: Callable[[str], bool], gateway: bool = True) -> str:
        """The gateway of ``endpoint_id`` in this sandbox (the same on a repeated
        Join); with ``gateway=False`` (IPv6 only) the endpoint is only recorded
        in the sandbox and "" returned.  Entries of endpoints for which
        ``alive(eid)`` is false are forgotten first (a crash left them)."""
        path = self._dir(sandbox_key)
        with self._locked(path):
            used = {}
            for name in os.listdir(path):
                if name.startswith("."):
                    continue
                entry = os.path.join(path, name)
                if name != endpoint_id and not alive(name):
                    _remove(entry)
                    continue
                with open(entry) as f:
                    used[name] = f.read().strip()
            if endpoint_id in used and (used[endpoint_id] or not gateway):
                return used[endpoint_id]
            if not gateway:
                with open(os.path.join(path, endpoint_id), "w"):
                    pass
                return ""
            taken = set(used.values())
            gw = FIRST
            while str(gw) in taken:
                gw += 1
                if gw > LAST:
                    raise RuntimeError("no free gateway address for this container")
            with open(os.path.join(path, endpoint_id), "w") as f:
                f.write(str(gw))
            return str(gw)

    def sandboxes(self) -> Dict[str, str]:
        """``{endpoint id: sandbox token}`` of every recorded endpoint."""
        out: Dict[str, str] = {}
        try:
            digests = os.listdir(self.root)
        except FileNotFoundError:
            return out
        for digest in digests:
            try:
                names = os.listdir(os.path.join(self.root, digest))
            except (FileNotFoundError, NotADirectoryError):
                continue
            out.update((n, digest) for n in names if not n.startswith("."))
        return out

    def release(self, endpoint_id: str) -> None:
        """Forget ``endpoint_id`` wherever it is; drop emptied sandbox dirs."""
        for entry in glob.glob(os.path.join(glob.escape(self.root), "*", endpoint_id)):
            path = os.path.dirname(entry)
            with self._locked(path):
                _remove(entry)
                rest = [n for n in os.listdir(path) if not n.startswith(".")]
            if not rest:
                _remove(os.path.join(path, ".lock"))
                try:
                    os.rmdir(path)
                except OSError:
                    pass  # a Join raced us in; it keeps the directory


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
