"""CPython clients of the fleet server: Reporter (a device's half of the report protocol, with
real HMAC, batching and resending until acknowledged: for tests, the load generator and demos)
and Admin (the admin API, for `mpota fleet ... --server`).
"""
from __future__ import annotations

import http.client
import json
import socket
from urllib.parse import quote, urlencode, urlsplit

from .. import MpotaError
from . import protocol


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise MpotaError(f"{url!r} is not a server URL", hint="e.g. http://127.0.0.1:8470")
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    return cls(u.hostname, u.port, timeout=timeout), u.path.rstrip("/")


def blank_report(n: int, event: str, **fields) -> dict:
    """A REPORT with every field (unknown ones null), as the protocol wants."""
    r = dict.fromkeys(protocol.FIELDS)
    r.update(n=n, event=event, dropped=0)
    unknown = set(fields) - set(protocol.FIELDS)
    if unknown:
        raise ValueError(f"not report fields: {sorted(unknown)}")
    r.update(fields)
    return r


class Reporter:
    """One device's report queue. report() adds a report with the next n; flush() sends the
    queue in batches (at most 16 reports and 4096 bytes each) and drops only what the server
    acknowledged (200 or 409 with "ack"); anything else keeps the reports for the next flush.
    Keeps one HTTP/1.1 connection open between calls."""

    def __init__(self, url: str, device: str, secret: bytes, *, timeout: float = 5.0, next_n: int = 1):
        self.url, self.device, self.secret, self.timeout = url, device, secret, timeout
        self.queue: list[dict] = []
        self.next_n = next_n
        self.acked = next_n - 1
        self._conn = None
        self.last_status = None

    def report(self, event: str, **fields) -> int:
        n = self.next_n
        self.next_n += 1
        self.queue.append(blank_report(n, event, **fields))
        return n

    def _batch(self) -> bytes:
        take = 1
        body = protocol.encode_batch(self.device, self.queue[:1])
        while take < min(len(self.queue), protocol.MAX_REPORTS):
            nxt = protocol.encode_batch(self.device, self.queue[:take + 1])
            if len(nxt) > protocol.MAX_BODY:
                break
            body, take = nxt, take + 1
        return body

    def post(self, body: bytes, signature: str | None = None) -> tuple[int, dict]:
        """POST one body (signed unless a signature is given); (status, JSON answer)."""
        if self._conn is None:
            self._conn, self._path = _connection(self.url, self.timeout)
        headers = {"Content-Type": "application/json", "X-Mpota-Device": self.device,
                   "X-Mpota-Signature": signature if signature is not None else protocol.sign(self.secret, body)}
        try:
            self._conn.request("POST", self._path + "/v1/reports", body=body, headers=headers)
            resp = self._conn.getresponse()
            data = resp.read()
            if resp.getheader("connection", "").lower() == "close":
                self.close()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        try:
            doc = json.loads(data)
        except ValueError:
            doc = {}
        self.last_status = resp.status
        return resp.status, doc

    def flush(self) -> bool:
        """Send everything queued. True when the queue is empty; False when the server refused
        a batch for a reason other than a replay (the reports stay). OSError: no connection."""
        while self.queue:
            status, doc = self.post(self._batch())
            if status in (200, 409) and isinstance(doc.get("ack"), int):
                self.acked = max(self.acked, doc["ack"])
                self.queue = [r for r in self.queue if r["n"] > self.acked]
            else:
                return False
        return True

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Admin:
    """The admin API with a bearer token. Raises MpotaError with the server's reason."""

    def __init__(self, url: str, token: str, timeout: float = 30.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def call(self, method: str, path: str, body: dict | None = None, query: dict | None = None,
             ok=(200, 201)) -> dict:
        conn, base = _connection(self.url, self.timeout)
        q = {k: v for k, v in (query or {}).items() if v is not None}
        full = base + path + (f"?{urlencode(q)}" if q else "")
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, full, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise MpotaError(f"cannot reach the fleet server at {self.url}: {getattr(e, 'strerror', None) or e}",
                             hint="is `mpota fleet serve` running there? (its first line says where)") from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {"error": raw[:200].decode(errors="replace")}
        if resp.status == 401:
            raise MpotaError(f"the fleet server at {self.url} refused the admin token",
                             hint="give the file `mpota fleet serve` uses: --token-file (default DB.token)")
        if resp.status not in ok:
            raise MpotaError(f"{method} {path}: {resp.status} {doc.get('error')}"
                             + (f": {doc['detail']}" if doc.get("detail") else ""), hint=doc.get("hint"))
        return doc

    def register(self, device: str, secret_hex: str, **opt) -> dict:
        return self.call("PUT", f"/v1/admin/devices/{quote(device, safe='')}",
                         {"secret": secret_hex, **{k: v for k, v in opt.items() if v is not None}})

    def unregister(self, device: str, forget: bool = False) -> dict:
        return self.call("DELETE", f"/v1/admin/devices/{quote(device, safe='')}", query={"forget": forget and "1"},
                         ok=(200, 404))

    def devices(self, **filters) -> dict:
        return self.call("GET", "/v1/admin/devices", query=filters)

    def device(self, device: str, limit: int = 100) -> dict | None:
        doc = self.call("GET", f"/v1/admin/devices/{quote(device, safe='')}", query={"limit": limit}, ok=(200, 404))
        return None if doc.get("error") == "unknown-device" else doc

    def events(self, **q) -> dict:
        return self.call("GET", "/v1/admin/events", query=q)

    def releases(self) -> dict:
        return self.call("GET", "/v1/admin/releases")

    def anomalies(self) -> dict:
        return self.call("GET", "/v1/admin/anomalies")

    def stats(self) -> dict:
        return self.call("GET", "/v1/admin/stats")

    # rollouts (docs/rollout.md "Fleet server")
    def start_rollout(self, release_dir: str, **config) -> dict:
        return self.call("POST", "/v1/admin/rollouts", {"release_dir": release_dir,
                                                        **{k: v for k, v in config.items() if v is not None}})

    def rollouts(self) -> dict:
        return self.call("GET", "/v1/admin/rollouts")

    def rollout(self, rollout_id: str) -> dict | None:
        doc = self.call("GET", f"/v1/admin/rollouts/{quote(rollout_id, safe='')}", ok=(200, 404))
        return None if doc.get("error") == "unknown-rollout" else doc

    def rollout_action(self, rollout_id: str, action: str, reason: str | None = None) -> dict:
        return self.call("POST", f"/v1/admin/rollouts/{quote(rollout_id, safe='')}/{action}",
                         {"reason": reason} if reason is not None else {})


def raw_request(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are to the server and read what comes back until it closes (for
    hostile-client tests: broken HTTP, slow bodies)."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
