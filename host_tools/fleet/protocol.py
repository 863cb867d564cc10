"""The report protocol (docs/fleet.md): limits, field rules, the HMAC, and the validation of a
batch. Bytes in, a Batch or a Refusal out; no I/O, so tests and the fuzzer feed bytes directly.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass

MAX_BODY = 4096          # bytes of a POST /v1/reports body; the server reads no further (413)
MAX_REPORTS = 16         # reports in one batch
BODY_TIMEOUT_S = 10.0    # the whole body must arrive within this (408)
MAX_DETAIL = 160
MAX_TEXT = 64            # version, board, chip, code, slot labels: short strings
MAX_INT = 2 ** 53        # JSON numbers that every client parses exactly

DEVICE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
SECRET_HEX = re.compile(r"[0-9a-fA-F]{64}\Z")
EVENTS = ("checked", "up-to-date", "downloading", "installed", "confirmed", "rolled-back",
          "refused", "failed", "no-memory", "boot")
ANNOUNCE = "announce"    # not sent by devices: a manifest fetch read from a web server's log
SLOT_STATES = ("valid", "new", "pending-verify", "invalid", "aborted", "undefined", "empty")
MAX_SLOTS = 4

# Every field of a report and its type: str (at most MAX_TEXT), int (0 <= n < MAX_INT), or
# special rules below. None is allowed wherever the spec says "or null" (the device did not know).
_TEXT = ("code", "version", "slot", "board", "chip", "target")
_INT = ("boots", "reset", "heap", "dropped")
FIELDS = ("n", "event", "code", "detail", "version", "slot", "slots", "board", "chip", "target",
          "digest", "boots", "reset", "heap", "dropped")
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")

# Refusal reasons, the status code each is answered with, and what the device should do.
REFUSALS = {
    "bad-signature": 401, "unknown-device": 404, "bad-report": 400, "too-large": 413,
    "slow-client": 408, "replay": 409, "bad-method": 405,
}


class Refusal(Exception):
    """A batch the server does not take: `reason` (a REFUSALS key), counted, answered with its
    status code and {"error": reason, ...}."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail

    @property
    def status(self) -> int:
        return REFUSALS[self.reason]

    def body(self) -> dict:
        return {"error": self.reason, **({"detail": self.detail} if self.detail else {})}


@dataclass(frozen=True)
class Batch:
    device: str
    reports: tuple  # of dicts with exactly FIELDS, in increasing n


def sign(secret: bytes, body: bytes) -> str:
    """X-Mpota-Signature for body: hex HMAC-SHA256 under the device's secret."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def mac_ok(secret: bytes, body: bytes, signature: str | None) -> bool:
    if not signature or len(signature) != 64:
        return False
    return hmac.compare_digest(sign(secret, body), signature.lower())


def parse_secret(text: str) -> bytes:
    """A device secret as given in files and the admin API: 64 hex digits (32 bytes)."""
    t = text.strip()
    if not SECRET_HEX.match(t):
        raise ValueError("a device secret is 64 hex digits (32 random bytes)")
    return bytes.fromhex(t)


def valid_device_id(text) -> bool:
    return isinstance(text, str) and DEVICE_ID.match(text) is not None


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse_batch(body: bytes, header_device: str | None) -> Batch:
    """The batch in a body whose MAC has been checked; Refusal('bad-report', why) otherwise."""
    if len(body) > MAX_BODY:
        raise Refusal("too-large")
    try:
        doc = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise Refusal("bad-report", f"not UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict) or set(doc) != {"device", "reports"}:
        raise Refusal("bad-report", 'the body is {"device": ID, "reports": [...]} and nothing else')
    device = doc["device"]
    if not valid_device_id(device):
        raise Refusal("bad-report", "device is not an id of 1-64 of A-Z a-z 0-9 . _ : -")
    if device != header_device:
        raise Refusal("bad-report", "device in the body is not the X-Mpota-Device header's")
    reports = doc["reports"]
    if not isinstance(reports, list) or not 1 <= len(reports) <= MAX_REPORTS:
        raise Refusal("bad-report", f"reports is a list of 1 to {MAX_REPORTS}")
    out, last = [], 0
    for i, r in enumerate(reports):
        try:
            rep = check_report(r)
        except ValueError as e:
            raise Refusal("bad-report", f"reports[{i}]: {e}") from None
        if rep["n"] <= last:
            raise Refusal("bad-report", f"reports[{i}]: n {rep['n']} is not above the previous report's {last}")
        last = rep["n"]
        out.append(rep)
    return Batch(device, tuple(out))


def _text(v) -> bool:
    return isinstance(v, str) and 1 <= len(v) <= MAX_TEXT and v.isprintable()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_report(r) -> dict:
    """One REPORT object, every field present and of its type; ValueError says which is not."""
    if not isinstance(r, dict):
        raise ValueError("not an object")
    missing = [k for k in FIELDS if k not in r]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    extra = sorted(set(r) - set(FIELDS))
    if extra:
        raise ValueError(f"unknown field {extra[0][:32]!r}")
    n = r["n"]
    if not _is_int(n) or not 1 <= n < MAX_INT:
        raise ValueError("n is an integer from 1")
    if r["event"] not in EVENTS:
        raise ValueError(f"event is one of {', '.join(EVENTS)}")
    for k in _TEXT:
        v = r[k]
        if v is not None and not _text(v):
            raise ValueError(f"{k} is null or printable text of 1 to {MAX_TEXT} characters")
    for k in _INT:
        v = r[k]
        if v is not None and not (_is_int(v) and 0 <= v < MAX_INT):
            raise ValueError(f"{k} is null or a whole number from 0")
    d = r["detail"]
    if d is not None and not (isinstance(d, str) and len(d) <= MAX_DETAIL and d.isprintable()):
        raise ValueError(f"detail is null or printable text of at most {MAX_DETAIL} characters")
    g = r["digest"]
    if g is not None and not (isinstance(g, str) and _DIGEST.match(g)):
        raise ValueError("digest is null or 64 lower-case hex digits")
    s = r["slots"]
    if s is not None:
        if not isinstance(s, dict) or len(s) > MAX_SLOTS:
            raise ValueError(f"slots is null or an object of at most {MAX_SLOTS} labels")
        for label, state in s.items():
            if not _text(label) or state not in SLOT_STATES:
                raise ValueError(f"slots maps a label to one of {', '.join(SLOT_STATES)}")
    return {k: r[k] for k in FIELDS}


def encode_batch(device: str, reports: list) -> bytes:
    """The body a client sends (compact JSON, as small as the device makes it)."""
    return json.dumps({"device": device, "reports": reports}, separators=(",", ":")).encode()
