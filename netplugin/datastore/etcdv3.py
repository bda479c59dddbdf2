"""The etcdv3 datastore: etcd's v3 API through its JSON gateway (etcd3gw).
Owns the mapping onto etcd v3 (revisions, transactions, watches, compaction, TLS/auth).

Keys and values are those of the v2 layout (``/calico/v1/...``), stored in
the v3 keyspace; ``version`` is the key's ``mod_revision``.

* Compare-and-swap is a transaction on ``mod_revision``; create-only a
  transaction on ``create_revision == 0``.
* Several endpoints: a request that could not be *sent* (connection refused,
  no connection within the time left, no leader) moves on to the next
  endpoint, all within ``timeout``.  A request that may have been applied
  (no answer, connection lost after sending) is never re-sent blindly: the
  adapter re-reads the key on another endpoint and decides whether it landed
  (conditional writes can never land twice), or reports the failure.  "It
  landed" means the key now holds the value written: writers are told
  apart by their values (Calico's records name their handle or host).
* Watches run from a revision, resume after a disconnect from the last
  revision seen + 1 and, after a compaction (``ErrCompacted``), re-read the
  whole prefix and deliver the difference (a resync) instead of a silent gap.
* TLS: ``ca_file`` is the one CA used, whatever ``REQUESTS_CA_BUNDLE`` or
  ``SSL_CERT_FILE`` say (the session does not read the environment);
  ``cert_file``/``key_file`` a client certificate.  ``username``/``password``:
  etcd auth (a token, renewed when etcd says it expired).

etcd3gw discovers the gateway's path (``/v3/`` on 3.4+, ``/v3beta/`` on
3.3); the requests themselves, the failover and the watch loop are ours.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import ssl
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import requests
from etcd3gw.client import Etcd3Client

from netplugin.datastore.base import (
    CompareFailed, Datastore, DatastoreError, DatastoreMisconfigured, DatastoreUnavailable,
    Event, Item, KeyExists, KeyNotFound, Members, NextMember, Watch, WatchSet, deliver_events,
    diff_snapshot, bracketed, endpoint_list, known_versions, normalize_prefix,
    parse_http_address)

_log = logging.getLogger(__name__)

DEFAULT_PORT = 2379
WATCH_POLL = 1.0      # seconds a watch stream stays silent before it is re-opened (bounds stop())
MAX_BACKOFF = 5.0     # seconds between two reconnection attempts of a watch, at most
RETRY_PAUSE = 0.1     # seconds between two rounds over the endpoints (election in progress)

# etcd's gRPC errors that mean "not applied, try again (elsewhere)".
_NOT_APPLIED = ("no leader", "not capable", "too many requests", "not enough started members",
                "unhealthy cluster")
_AUTH_ERRORS = ("authentication failed", "user name is empty", "user name not found",
                "invalid user ID or password", "permission denied", "authentication is not enabled")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _unb64(text: Optional[str]) -> str:
    return base64.b64decode(text or "").decode("utf-8")


def _range_end(prefix: str) -> str:
    """The first key after every key starting with ``prefix`` (base64)."""
    raw = bytearray(prefix.encode("utf-8"))
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return _b64("\0")
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode("ascii")


def _key(key: str) -> str:
    return key if key.startswith("/") else "/" + key


class _Failed(Exception):
    """One attempt on one endpoint failed.  ``sent``: the request may have
    been applied; ``reason``: words for the operator."""

    def __init__(self, reason: str, sent: bool, misconfigured: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.sent = sent
        self.misconfigured = misconfigured


class _Answer(Exception):
    """etcd answered with an error that is final for this request."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _reason(exc: BaseException) -> Tuple[str, bool]:
    """(words, maybe-sent) for a requests failure."""
    if isinstance(exc, requests.exceptions.SSLError):
        text = str(exc)
        for marker in ("certificate verify failed", "unknown ca", "bad certificate",
                       "certificate required", "wrong version number", "handshake failure"):
            if marker in text.lower():
                return f"TLS failed: {marker}", False
        return "TLS failed: " + text[-200:], False
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "no connection within the time left", False
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = str(exc)
        if "Connection refused" in text:
            return "connection refused", False
        if "Name or service not known" in text or "Temporary failure in name resolution" in text:
            return "cannot resolve the host name", False
        if "NewConnectionError" in text or "Failed to establish" in text:
            return "cannot connect", False
        if "Read timed out" in text:
            return "no answer in time", True
        return "connection lost", True
    if isinstance(exc, requests.exceptions.Timeout):
        return "no answer in time", True
    return f"{type(exc).__name__}: {exc}", True


class Etcd3Datastore(Datastore):
    name = "etcdv3"

    def __init__(self, endpoints: Sequence[str] = ("http://127.0.0.1:2379",),
                 timeout: float = 5.0, ca_file: str = "", cert_file: str = "",
                 key_file: str = "", username: str = "", password: str = ""):
        self._endpoints = [parse_http_address(e, "etcd endpoint", DEFAULT_PORT,
                                              "http(s)://host:port")
                           for e in endpoint_list(endpoints, "etcd")]
        self._uris = [f"{p}://{bracketed(h)}:{port}" for p, h, port in self._endpoints]
        self.address = ", ".join(self._uris)
        self.timeout = float(timeout)
        self._username, self._password = username, password
        self._check_tls_files(ca_file, cert_file, key_file)
        self._session = requests.Session()
        self._session.trust_env = False   # REQUESTS_CA_BUNDLE, proxies: never ours
        self._session.verify = ca_file or _default_ca()
        if cert_file:
            self._session.cert = (cert_file, key_file)
        self._session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=32))
        self._session.mount("https://", requests.adapters.HTTPAdapter(pool_maxsize=32))
        self._clients = [Etcd3Client(host=h, port=port, protocol=p, timeout=self.timeout,
                                     session=self._session) for p, h, port in self._endpoints]
        self._members = Members(self._uris, self.timeout, RETRY_PAUSE)
        self._token: Optional[str] = None
        self._watchset = WatchSet()

    @classmethod
    def from_config(cls, cfg) -> "Etcd3Datastore":
        return cls(cfg.endpoints, cfg.timeout, ca_file=cfg.ca_file, cert_file=cfg.cert_file,
                   key_file=cfg.key_file, username=cfg.username, password=cfg.password)

    def __repr__(self):
        return f"Etcd3Datastore({self.address})"

    def _check_tls_files(self, ca_file: str, cert_file: str, key_file: str) -> None:
        """Unreadable or broken certificate files cannot heal by waiting."""
        for what, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
            if not path:
                continue
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise DatastoreMisconfigured(
                    f"{self.name} at {self.address}: cannot read {what} {path}: "
                    f"{e.strerror or e}") from None
        try:
            ctx = ssl.create_default_context()
            if ca_file:
                ctx.load_verify_locations(cafile=ca_file)
            if cert_file:
                ctx.load_cert_chain(cert_file, key_file or None)
        except (ssl.SSLError, ValueError) as e:
            raise DatastoreMisconfigured(
                f"{self.name} at {self.address}: bad certificate files "
                f"({ca_file or '-'}, {cert_file or '-'}, {key_file or '-'}): {e}") from None

    # -- one request -------------------------------------------------------

    def _headers(self) -> Dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    def _post_once(self, index: int, path: str, payload: dict, read_timeout: float,
                   connect_timeout: float) -> dict:
        client = self._clients[index]
        try:
            if client._api_path is None:
                client._api_path = _discover(self._session, client.base_url,
                                             (connect_timeout, read_timeout))
            resp = self._session.post(client.base_url + client._api_path + path,
                                      data=json.dumps(payload), headers=self._headers(),
                                      timeout=(connect_timeout, read_timeout))
        except requests.exceptions.RequestException as e:
            reason, sent = _reason(e)
            raise _Failed(reason, sent, isinstance(e, requests.exceptions.SSLError)) from e
        except _Failed:
            raise
        return self._decode_answer(resp)

    def _decode_answer(self, resp) -> dict:
        try:
            body = resp.json()
        except ValueError:
            raise _Failed(f"answered HTTP {resp.status_code} with something that is not "
                          "etcd's JSON", sent=True) from None
        if not isinstance(body, dict):
            raise _Failed(f"answered HTTP {resp.status_code} with something that is not "
                          "etcd's JSON", sent=True)
        if resp.status_code == 200:
            return body
        message = str(body.get("error") or body.get("message") or body)
        raise _Answer(resp.status_code, message)

    def _request(self, path: str, payload: dict, idempotent: bool,
                 renewed: bool = False) -> dict:
        """POST ``payload``; failover as described in the module docstring.
        A non-idempotent request that may have been applied raises
        ``_Failed(sent=True)`` for the caller to decide."""
        n = len(self._clients)

        def attempt(index: int, left: float) -> dict:
            if self._username and self._token is None:
                try:
                    self._authenticate(index, left)
                except _Failed as e:
                    if e.misconfigured:
                        raise self._misconfigured(index, e.reason) from None
                    raise NextMember(e.reason) from None
            connect = min(left, max(0.2, self.timeout / n))
            # half the timeout per member: a member whose request went to
            # a leader that died holds it until its own (long) timeout
            wait = min(left, max(0.5, self.timeout / 2)) if n > 1 else left
            try:
                return self._post_once(index, path, payload, wait, connect)
            except _Failed as e:
                if e.misconfigured:
                    raise self._misconfigured(index, e.reason) from None
                if e.sent and not idempotent:
                    self._members.move_from(index)
                    raise
                raise NextMember(e.reason) from None
            except _Answer as e:
                low = e.message.lower()
                if e.status == 401 and self._username and not renewed:
                    self._token = None   # expired token: a new one, once
                    return self._request(path, payload, idempotent, renewed=True)
                if any(m.lower() in low for m in _AUTH_ERRORS) or e.status in (401, 403):
                    raise self._misconfigured(index, e.message) from None
                if any(m in low for m in _NOT_APPLIED):
                    raise NextMember(e.message) from None
                if e.status in (503, 504):   # timed out, leader changed: maybe applied
                    if not idempotent:
                        self._members.move_from(index)
                        raise _Failed(e.message, sent=True) from None
                    raise NextMember(e.message) from None
                raise DatastoreUnavailable(
                    f"{self.name} at {self._uris[index]} failed: {e.message}") from None

        return self._members.call(attempt, self.name, self.address)

    def _misconfigured(self, index: int, reason: str) -> DatastoreMisconfigured:
        return DatastoreMisconfigured(f"{self.name} at {self._uris[index]}: {reason}")

    def _authenticate(self, index: int, left: float) -> None:
        payload = {"name": self._username, "password": self._password}
        try:
            answer = self._post_once(index, "auth/authenticate", payload, left,
                                     min(left, max(0.2, self.timeout / len(self._clients))))
        except _Answer as e:
            raise _Failed(f"etcd auth as {self._username!r} failed: {e.message}", sent=False,
                          misconfigured=e.status in (400, 401, 403)) from None
        self._token = answer.get("token")

    # -- operations --------------------------------------------------------

    def _range(self, key: str, prefix: bool = False, **extra) -> Tuple[List[Item], int]:
        payload = {"key": _b64(key), **extra}
        if prefix:
            payload["range_end"] = _range_end(key)
        r = self._request("kv/range", payload, idempotent=True)
        items = [Item(_unb64(kv["key"]), _unb64(kv.get("value")), int(kv["mod_revision"]))
                 for kv in r.get("kvs", [])]
        return items, int(r["header"]["revision"])

    def _get_or_none(self, key: str) -> Optional[Item]:
        items, _ = self._range(key)
        return items[0] if items else None

    def _txn(self, compare: list, success: list, failure: list) -> dict:
        return self._request("kv/txn", {"compare": compare, "success": success,
                                        "failure": failure}, idempotent=False)

    def get(self, key: str) -> Item:
        key = _key(key)
        item = self._get_or_none(key)
        if item is None:
            raise KeyNotFound(key)
        return item

    @staticmethod
    def _check_value(value) -> None:
        if not isinstance(value, str):
            raise DatastoreError(f"datastore values must be strings, not {type(value).__name__}")

    def _cond_put(self, key: str, value: str, compare: list) -> Optional[Item]:
        """Put under ``compare``; None when the comparison failed.  If the
        answer was lost, re-read and decide (see ``_landed``)."""
        try:
            r = self._txn(compare, [{"request_put": {"key": _b64(key), "value": _b64(value)}}], [])
        except _Failed as e:
            return self._landed(key, value, compare, e)
        if not r.get("succeeded"):
            return None
        return Item(key, value, int(r["header"]["revision"]))

    def _landed(self, key: str, value: str, compare: list, failure: _Failed) -> Optional[Item]:
        """A conditional put whose answer was lost: re-read the key (on the
        next endpoint).  Still as the comparison wanted: not applied, send it
        again (it is conditional, so it cannot land twice).  Changed to our
        value: it landed.  Changed otherwise: the key's history says whether
        the first change after the compared state was ours (it landed, and
        someone wrote after it) or not (the comparison failed)."""
        current = self._get_or_none(key)
        want = compare[0]
        if want["target"] == "CREATE":
            unchanged = current is None
        else:
            unchanged = current is not None and current.version == int(want["mod_revision"])
        if unchanged:
            try:
                r = self._txn(compare, [{"request_put": {"key": _b64(key),
                                                         "value": _b64(value)}}], [])
            except _Failed as e:
                raise DatastoreUnavailable(
                    f"{self.name} at {self.address}: write of {key} not confirmed: "
                    f"{failure.reason}, then {e.reason}") from None
            if r.get("succeeded"):
                return Item(key, value, int(r["header"]["revision"]))
            current = self._get_or_none(key)
        if current is not None and current.value == value:
            return current
        return self._first_change_ours(key, value, want, current, failure)

    def _first_change_ours(self, key: str, value: str, want: dict, current: Optional[Item],
                           failure: _Failed) -> Optional[Item]:
        """The key's first change after the state ``want`` compared against,
        as an Item when it wrote ``value`` (ours), else None.  Only one write
        can match a comparison, so this decides a lost answer exactly; when
        the history needed is gone (compacted) the outcome is unknown:
        DatastoreUnavailable, never a guess."""
        def unknown(why: str) -> DatastoreUnavailable:
            return DatastoreUnavailable(
                f"{self.name} at {self.address}: write of {key} not confirmed "
                f"({failure.reason}) and {why}")
        try:
            if want["target"] == "CREATE":
                if current is None:
                    return None            # changed to absent: a delete came after
                raw = self._request("kv/range", {"key": _b64(key)},
                                    idempotent=True).get("kvs", [])
                if not raw:
                    return None
                items, _ = self._range(key, revision=str(int(raw[0]["create_revision"])))
            else:
                items = self._first_change_after(key, int(want["mod_revision"]))
        except DatastoreUnavailable as exc:
            raise unknown(f"its history cannot be read: {exc}") from None
        first = items[0] if items else None
        if first is not None and first.value == value:
            return first
        return None

    def _first_change_after(self, key: str, since: int) -> List[Item]:
        """The key as its first change after revision ``since`` (when it was
        last modified at ``since``) left it: [] for a delete.  A binary search
        over revisions (the state at a revision is "still at since" up to that
        change and never again after), so a key written thousands of times
        meanwhile costs a few dozen reads."""
        _, now = self._range(key)
        lo, hi = since, now              # at lo: unchanged; at hi (now): changed
        while hi - lo > 1:
            mid = (lo + hi) // 2
            items, _ = self._range(key, revision=str(mid))
            if items and items[0].version == since:
                lo = mid
            else:
                hi = mid
        items, _ = self._range(key, revision=str(hi))
        return items

    def put(self, key: str, value: str) -> Item:
        key = _key(key)
        self._check_value(value)
        try:
            r = self._request("kv/put", {"key": _b64(key), "value": _b64(value)},
                              idempotent=False)
        except _Failed as e:
            current = self._get_or_none(key)
            if current is not None and current.value == value:
                return current
            # not there: put again only over what we just read
            compare = ([{"key": _b64(key), "target": "CREATE", "result": "EQUAL",
                         "create_revision": "0"}] if current is None else
                       [{"key": _b64(key), "target": "MOD", "result": "EQUAL",
                         "mod_revision": str(current.version)}])
            item = self._landed(key, value, compare, e)
            if item is None:
                raise DatastoreUnavailable(
                    f"{self.name} at {self.address}: write of {key} not confirmed "
                    f"({e.reason}) and the key changed meanwhile") from None
            return item
        return Item(key, value, int(r["header"]["revision"]))

    def create(self, key: str, value: str) -> Item:
        key = _key(key)
        self._check_value(value)
        item = self._cond_put(key, value, [{"key": _b64(key), "target": "CREATE",
                                            "result": "EQUAL", "create_revision": "0"}])
        if item is None:
            raise KeyExists(key)
        return item

    def compare_and_swap(self, key: str, value: str, version: int) -> Item:
        key = _key(key)
        self._check_value(value)
        if int(version) <= 0:
            raise CompareFailed(key)
        item = self._cond_put(key, value, [{"key": _b64(key), "target": "MOD", "result": "EQUAL",
                                            "mod_revision": str(int(version))}])
        if item is None:
            raise CompareFailed(key)
        return item

    def delete(self, key: str, version: Optional[int] = None) -> None:
        key = _key(key)
        if version is None:
            try:
                r = self._request("kv/deleterange", {"key": _b64(key)}, idempotent=False)
            except _Failed:
                if self._get_or_none(key) is None:
                    return   # gone: ours landed (or someone else's: same state)
                r = self._request("kv/deleterange", {"key": _b64(key)}, idempotent=True)
            if int(r.get("deleted", 0)) == 0:
                raise KeyNotFound(key)
            return
        if int(version) <= 0:
            self.get(key)
            raise CompareFailed(key)
        compare = [{"key": _b64(key), "target": "MOD", "result": "EQUAL",
                    "mod_revision": str(int(version))}]
        success = [{"request_delete_range": {"key": _b64(key)}}]
        try:
            r = self._txn(compare, success, [])
        except _Failed as e:
            current = self._get_or_none(key)
            if current is None:
                return
            if current.version != int(version):
                raise CompareFailed(key) from None
            try:
                r = self._txn(compare, success, [])
            except _Failed as e2:
                raise DatastoreUnavailable(
                    f"{self.name} at {self.address}: delete of {key} not confirmed: "
                    f"{e.reason}, then {e2.reason}") from None
        if not r.get("succeeded"):
            if self._get_or_none(key) is None:
                raise KeyNotFound(key)
            raise CompareFailed(key)

    def delete_prefix(self, prefix: str) -> int:
        p = normalize_prefix(_key(prefix))
        # deleting a range again is harmless: idempotent
        r = self._request("kv/deleterange", {"key": _b64(p), "range_end": _range_end(p)},
                          idempotent=True)
        return int(r.get("deleted", 0))

    def list_prefix(self, prefix: str) -> List[Item]:
        p = normalize_prefix(_key(prefix))
        return self._range(p, prefix=True)[0]

    def ping(self) -> None:
        """A linearizable read: answers only when the cluster has a quorum."""
        self._range("/calico/", prefix=True, limit=1, keys_only=True)

    # -- watches -----------------------------------------------------------

    def watch_prefix(self, prefix: str, callback: Callable[[Event], None],
                     since: Optional[int] = None) -> Watch:
        p = normalize_prefix(_key(prefix))
        state: Dict = {"known": None, "next": None}

        def start() -> None:
            items, revision = self._range(p, prefix=True)
            state["known"] = known_versions(items, since)
            state["next"] = (revision if since is None else int(since)) + 1

        return self._watchset.start(prefix, start, lambda watch: self._watch_loop(
            watch, p, callback, state, start))

    def _resync(self, p: str, state) -> List[Event]:
        """A full re-read of the prefix, as events against what was known."""
        items, revision = self._range(p, prefix=True)
        state["next"] = revision + 1
        return diff_snapshot(state["known"], items, revision)

    def _watch_loop(self, watch: Watch, p: str, callback, state, start) -> None:
        delay = 0.2
        while not watch.stopped:
            try:
                if state["next"] is None:
                    start()
                if state.get("resync"):   # compacted: a full re-read before watching on
                    deliver_events(watch, callback, self._resync(p, state))
                    state["resync"] = False
                self._watch_stream(watch, p, callback, state)
                delay = 0.2
            except _Compacted as e:
                _log.warning("watch of %s: history compacted up to revision %s; "
                             "re-reading the prefix", p, e.revision)
                state["resync"] = True
            except (DatastoreUnavailable, _Failed, _Answer) as e:
                if watch.stopped:
                    break
                _log.warning("watch of %s: %s; retrying in %.1f s", p, e, delay)
                watch.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    def _watch_stream(self, watch: Watch, p: str, callback, state) -> None:
        """One watch stream from ``state["next"]``, until it stays silent for
        WATCH_POLL seconds, fails, or the watch is stopped."""
        index = self._members.current
        n = len(self._clients)
        last_error: Optional[Exception] = None
        for step in range(n):
            i = (index + step) % n
            client = self._clients[i]
            payload = {"create_request": {"key": _b64(p), "range_end": _range_end(p),
                                          "start_revision": str(state["next"])}}
            try:
                if client._api_path is None:
                    client._api_path = _discover(self._session, client.base_url,
                                                 (self.timeout, self.timeout))
                resp = self._session.post(client.base_url + client._api_path + "watch",
                                          data=json.dumps(payload), headers=self._headers(),
                                          stream=True, timeout=(min(self.timeout, 2.0),
                                                                WATCH_POLL))
            except requests.exceptions.RequestException as e:
                last_error = _Failed(f"{self._uris[i]}: {_reason(e)[0]}", sent=False)
                continue
            break
        else:
            raise last_error or _Failed("no endpoint", sent=False)
        try:
            if resp.status_code != 200:
                if resp.status_code == 401 and self._username:
                    self._token = None
                    self._authenticate(i, self.timeout)
                raise _Failed(f"{self._uris[i]} answered HTTP {resp.status_code}", sent=False)
            for line in resp.iter_lines(chunk_size=None):
                if watch.stopped:
                    return
                if not line.strip():
                    continue
                try:
                    result = json.loads(line).get("result") or {}
                except ValueError:
                    raise _Failed(f"{self._uris[i]}: garbage in the watch stream", sent=False)
                if int(result.get("compact_revision", 0) or 0) > 0:
                    raise _Compacted(int(result["compact_revision"]))
                if result.get("canceled"):
                    raise _Failed(f"{self._uris[i]}: watch canceled: "
                                  f"{result.get('cancel_reason', '')}", sent=False)
                events = self._events(result.get("events") or [], p, state)
                deliver_events(watch, callback, events)
        except requests.exceptions.ConnectionError as e:
            if "timed out" in str(e):
                return   # silent for WATCH_POLL: open again (stop() is checked)
            raise _Failed(f"{self._uris[i]}: {_reason(e)[0]}", sent=False) from e
        except requests.exceptions.RequestException as e:
            raise _Failed(f"{self._uris[i]}: {_reason(e)[0]}", sent=False) from e
        finally:
            resp.close()

    @staticmethod
    def _events(raw: list, p: str, state) -> List[Event]:
        known = state["known"]
        events = []
        for ev in raw:
            kv = ev.get("kv") or {}
            key = _unb64(kv.get("key"))
            revision = int(kv.get("mod_revision", 0))
            state["next"] = max(state["next"], revision + 1)
            if not key.startswith(p):
                continue
            if ev.get("type", "PUT") == "DELETE":
                known.pop(key, None)
                events.append(Event("delete", key, None, revision))
            else:
                known[key] = revision
                events.append(Event("put", key, _unb64(kv.get("value")), revision))
        return events

    def compact(self, revision: Optional[int] = None) -> int:
        """Compact etcd's history up to ``revision`` (default: now); returns it.
        For tests and operators; the plugin never compacts."""
        if revision is None:
            revision = self._range("/calico/", prefix=True, limit=1, keys_only=True)[1]
        self._request("kv/compaction", {"revision": str(revision), "physical": True},
                      idempotent=True)
        return revision

    def close(self) -> None:
        self._watchset.stop_all()
        self._session.close()


class _Compacted(Exception):
    def __init__(self, revision: int):
        super().__init__(f"compacted up to {revision}")
        self.revision = revision


def _default_ca():
    """Without ``ca_file``: the bundle the environment names, else requests'."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or True


def _discover(session, base_url: str, timeout) -> str:
    """etcd3gw's API path discovery (``/v3/`` or ``/v3beta/``) on our session."""
    probe = Etcd3Client(session=session, timeout=timeout)
    probe.protocol, rest = base_url.split("://", 1)
    probe.host, _, port = rest.rpartition(":")
    probe.host = probe.host.strip("[]")
    probe.port = int(port)
    try:
        return probe.api_path
    except Exception as e:  # etcd3gw wraps requests' errors in its own
        cause = e.__context__ if isinstance(e.__context__, requests.exceptions.RequestException) else None
        if cause is not None:
            raise cause from None
        raise _Failed(f"API discovery failed: {e}", sent=False) from None
