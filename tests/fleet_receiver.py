"""A fleet server's device half, in plain CPython, for the device tests (tests/test_fleet_device.py).

It implements docs/fleet.md's report protocol as a server must, independently of the device
code: POST /v1/reports checked with CPython's `hmac` (HMAC-SHA256 of the raw body under the
device's secret), every field of every report checked against the protocol, the counter
stored per device, 200 {"ack": N} / 409 replay / 400 / 401 / 404 / 413 / 408 answered as the
protocol says, and PUT /v1/admin/devices/{id} (bearer token) to register a device. Tests steer
it like tests/faultserver.py steers a release server: `mode` makes it lose its answers after
committing, stall, or answer an error status.

What it records is what the tests assert on: the committed reports per device (`reports`),
every request and its answer (`log`), duplicates, refusals by reason, and `conflicts`: a
counter that arrived twice with two different reports (a device that reused a counter).

It has the interface the lead can put `mpota fleet serve` behind later: start(), stop(), url,
register(id, secret_hex), reports[id].
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mpota.faultserver import hold_open

EVENTS = {"checked", "up-to-date", "downloading", "installed", "confirmed", "rolled-back", "refused",
          "failed", "no-memory", "boot"}
SLOT_STATES = {"valid", "new", "pending-verify", "invalid", "aborted", "undefined", "empty"}
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
MAX_BODY = 4096
MAX_REPORTS = 16
SLOW_CLIENT_S = 10.0
STALL_S = 60.0


def _opt(t):
    return lambda v: v is None or isinstance(v, t)


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# every field of a report and what it may hold (docs/fleet.md)
FIELDS = {
    "n": lambda v: _int(v) and v >= 1,
    "event": lambda v: v in EVENTS,
    "code": _opt(str),
    "detail": lambda v: v is None or (isinstance(v, str) and len(v) <= 160),
    "version": _opt(str),
    "slot": _opt(str),
    "slots": lambda v: isinstance(v, dict) and all(isinstance(k, str) and s in SLOT_STATES for k, s in v.items()),
    "board": lambda v: isinstance(v, str),
    "chip": lambda v: isinstance(v, str),
    "target": _opt(str),
    "digest": lambda v: v is None or (isinstance(v, str) and bool(_HEX64.match(v))),
    "boots": _int,
    "reset": _int,
    "heap": _int,
    "dropped": _int,
}


def check_report(r) -> str | None:
    """What is wrong with one report, or None."""
    if not isinstance(r, dict):
        return "a report is not an object"
    if set(r) != set(FIELDS):
        return f"fields {sorted(set(r) ^ set(FIELDS))} missing or unknown"
    for k, ok in FIELDS.items():
        if not ok(r[k]):
            return f"{k}={r[k]!r}"
    return None


class FleetReceiver:
    def __init__(self, token: str | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.token = token
        self.devices: dict[str, dict] = {}          # id -> {"secret": bytes, "board", "interval_s"}
        self.reports: dict[str, list[dict]] = {}    # id -> committed reports, in order
        self.highest: dict[str, int] = {}
        self.raw: dict[tuple[str, int], bytes] = {}  # (id, n) -> the report as received
        self.duplicates = 0
        self.conflicts: list[tuple[str, int]] = []
        self.refused: Counter = Counter()
        self.log: list[dict] = []                   # {"device", "status", "ns", "t"} per POST
        self.mode = "ok"        # ok | lost-ack | stall | status=NNN
        self.mode_times: int | None = None          # how many requests the mode applies to
        self.lock = threading.Lock()
        self.httpd = None
        self.port = 0

    # ---- control ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, port: int | None = None) -> FleetReceiver:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                owner._post(self)

            def do_PUT(self):
                owner._put(self)

            def do_GET(self):
                if self.path == "/healthz":
                    return _answer(self, 200, {"ok": True})
                _answer(self, 404, {"error": "not-found"})

        self.httpd = ThreadingHTTPServer((self.host, self.port if port is None else port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Down: nothing listens on the port any more (start(port) brings it back there)."""
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def register(self, device: str, secret_hex: str, board: str | None = None, interval_s: int | None = None):
        self.devices[device] = {"secret": bytes.fromhex(secret_hex), "board": board, "interval_s": interval_s}

    def events(self, device: str) -> list[str]:
        return [r["event"] for r in self.reports.get(device, [])]

    def _take_mode(self) -> str:
        with self.lock:
            mode = self.mode
            if mode != "ok" and self.mode_times is not None:
                self.mode_times -= 1
                if self.mode_times <= 0:
                    self.mode, self.mode_times = "ok", None
            return mode

    # ---- the protocol ------------------------------------------------------------------------
    def _refuse(self, h, status, reason, device=None, detail=None):
        self.refused[reason] += 1
        self.log.append({"device": device, "status": status, "ns": [], "t": time.monotonic(), "error": reason})
        body = {"error": reason}
        if detail:
            body["detail"] = detail
        _answer(h, status, body)

    def _post(self, h):
        if h.path != "/v1/reports":
            return _answer(h, 404, {"error": "not-found"})
        try:
            length = int(h.headers.get("Content-Length", ""))
        except ValueError:
            return self._refuse(h, 400, "bad-report", detail="no Content-Length")
        if length > MAX_BODY:
            h.close_connection = True
            return self._refuse(h, 413, "too-large")
        body = _read_body(h, length)
        if body is None:
            h.close_connection = True
            return self._refuse(h, 408, "slow-client")
        device = h.headers.get("X-Mpota-Device", "")
        known = self.devices.get(device)
        if known is None:
            return self._refuse(h, 404, "unknown-device", device)
        mac = hmac.new(known["secret"], body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, h.headers.get("X-Mpota-Signature", "")):
            return self._refuse(h, 401, "bad-signature", device)
        try:
            doc = json.loads(body)
        except ValueError:
            return self._refuse(h, 400, "bad-report", device, "not JSON")
        if not isinstance(doc, dict) or doc.get("device") != device or not isinstance(doc.get("reports"), list) \
                or not 1 <= len(doc["reports"]) <= MAX_REPORTS:
            return self._refuse(h, 400, "bad-report", device, "device or reports")
        ns = []
        for r in doc["reports"]:
            why = check_report(r)
            if why:
                return self._refuse(h, 400, "bad-report", device, why)
            ns.append(r["n"])
        if ns != sorted(set(ns)):
            return self._refuse(h, 400, "bad-report", device, "reports not in increasing n")
        mode = self._take_mode()
        if mode.startswith("status="):
            status = int(mode[7:])
            self.log.append({"device": device, "status": status, "ns": ns, "t": time.monotonic()})
            return _answer(h, status, {"error": "steered"})
        with self.lock:  # "commit"
            top = self.highest.get(device, 0)
            new = 0
            for r in doc["reports"]:
                raw = json.dumps(r, sort_keys=True).encode()
                if r["n"] <= top:
                    self.duplicates += 1
                    if self.raw.get((device, r["n"]), raw) != raw:
                        self.conflicts.append((device, r["n"]))
                    continue
                self.reports.setdefault(device, []).append(r)
                self.raw[(device, r["n"])] = raw
                top = r["n"]
                new += 1
            self.highest[device] = top
        if mode == "stall":  # committed; the answer never comes, the connection stays open
            self.log.append({"device": device, "status": None, "ns": ns, "t": time.monotonic()})
            hold_open(h.connection, STALL_S)
            h.close_connection = True
            return
        if mode == "lost-ack":  # committed; the connection drops before the answer
            self.log.append({"device": device, "status": None, "ns": ns, "t": time.monotonic()})
            h.close_connection = True
            return
        status = 200 if new else 409
        self.log.append({"device": device, "status": status, "ns": ns, "t": time.monotonic()})
        _answer(h, status, {"ack": top} if new else {"error": "replay", "ack": top})

    def _put(self, h):
        m = re.fullmatch(r"/v1/admin/devices/([^/?]+)", h.path)
        if not m:
            return _answer(h, 404, {"error": "not-found"})
        if not self.token or h.headers.get("Authorization") != f"Bearer {self.token}":
            return _answer(h, 401, {"error": "unauthorized"})
        try:
            length = int(h.headers.get("Content-Length", "0"))
            doc = json.loads(h.rfile.read(length))
            device = m.group(1)
            if not _ID.match(device) or not re.fullmatch(r"[0-9a-f]{64}", doc["secret"]):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return _answer(h, 400, {"error": "bad-request"})
        self.register(device, doc["secret"], doc.get("board"), doc.get("interval_s"))
        _answer(h, 200, {"device": device})


def _answer(h, status, obj):
    body = json.dumps(obj).encode()
    try:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _read_body(h, length: int) -> bytes | None:
    """The whole body within SLOW_CLIENT_S, else None."""
    deadline = time.monotonic() + SLOW_CLIENT_S
    data = b""
    while len(data) < length:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        h.connection.settimeout(left)
        try:
            chunk = h.rfile.read1(length - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    h.connection.settimeout(None)
    return data
