"""The rollout document (docs/rollout.md): build, sign, open and judge `rollout.json`.

Plain functions, no I/O: the fleet server signs with them, `mpota rollout` and `mpota mirror`
check with them, the bench and the tests judge thousands of devices with them, and the device
agent (device/ota/rollout.py) follows the same rules, which tests/test_rollout_*.py check
against each other.
"""
from __future__ import annotations

import hashlib
import json

from . import MpotaError, dsse

PAYLOAD_TYPE = "application/vnd.mpota.rollout+json"
SCHEMA = 1
MAX_BYTES = 4096         # the device reads the document into its 4 KiB block buffer
MAX_STAGES = 16
MAX_NAMES = 64           # names in targets (all lists together), and in exclude
FULL_BP = 10000          # share_bp of the whole fleet
JITTER_PRIME = 1000003
CLOCK_FLOOR = 1704067200  # 2024-01-01T00:00:00Z: a clock that reads earlier was never set
ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")

# codes (docs/rollout.md "Decision"); HELD codes hold a release back without blaming it
HELD = ("rollout-missing", "rollout-other-release", "rollout-replayed", "rollout-expired",
        "rollout-halted", "not-in-rollout", "no-clock", "outside-window")
BAD = ("rollout-bad", "rollout-unknown-key", "rollout-bad-signature")


class RolloutError(MpotaError):
    """A rollout document that is malformed, not signed by a rollout key, or holds a device back."""

    def __init__(self, code: str, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.code = code


# ---- building and checking the body -------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _names(v, what: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(n, str) and 1 <= len(n) <= 64 and set(n) <= ID_CHARS
                                          for n in v):
        raise RolloutError("rollout-bad", f"{what} must be a list of names of [A-Za-z0-9._:-], 1-64 chars")
    return v


def check_window(w) -> dict:
    """A maintenance window as docs/rollout.md has it, or RolloutError."""
    if not isinstance(w, dict):
        raise RolloutError("rollout-bad", "window must be an object")
    cron = w.get("cron")
    parse_cron(cron)
    for key, lo, hi, default in (("duration_s", 60, 86400, None), ("utc_offset_min", -720, 840, 0),
                                 ("jitter_s", 0, 86400, 0)):
        v = w.get(key, default)
        if not _is_int(v) or not lo <= v <= hi:
            raise RolloutError("rollout-bad", f"window {key} must be a whole number from {lo} to {hi}")
    return {"cron": cron, "duration_s": w["duration_s"], "utc_offset_min": w.get("utc_offset_min", 0),
            "jitter_s": w.get("jitter_s", 0)}


def check(body: dict) -> dict:
    """The body if it follows schema 1 (docs/rollout.md "The document"), else RolloutError."""
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        raise RolloutError("rollout-bad", f"not a rollout document of schema {SCHEMA}")
    rel = body.get("release")
    if not isinstance(rel, str) or len(rel) != 64 or set(rel) - set("0123456789abcdef"):
        raise RolloutError("rollout-bad", "release must be 64 lower-case hex digits (the manifest envelope's SHA-256)")
    for k in ("version", "rollout"):
        if not isinstance(body.get(k), str) or not 1 <= len(body[k]) <= 64 or not body[k].isprintable():
            raise RolloutError("rollout-bad", f"{k} must be printable text of 1-64 characters")
    issued, expires = body.get("issued"), body.get("expires")
    if not (_is_int(issued) and _is_int(expires) and 0 < issued < expires < 2 ** 40):
        raise RolloutError("rollout-bad", "issued and expires must be Unix seconds with issued < expires")
    stages = body.get("stages")
    if not isinstance(stages, list) or not 1 <= len(stages) <= MAX_STAGES:
        raise RolloutError("rollout-bad", f"stages must list 1 to {MAX_STAGES} stages")
    last = 0
    for s in stages:
        if not (isinstance(s, dict) and _is_int(s.get("at")) and _is_int(s.get("share_bp"))
                and 0 <= s["share_bp"] <= FULL_BP and s["at"] >= last):
            raise RolloutError("rollout-bad", "each stage is {at, share_bp} with at non-decreasing and "
                                              "share_bp 0-10000")
        last = s["at"]
    halted = body.get("halted")
    if halted is not None and not (isinstance(halted, str) and len(halted) <= 160):
        raise RolloutError("rollout-bad", "halted must be null or a reason of at most 160 characters")
    targets = body.get("targets")
    if targets is not None:
        if not isinstance(targets, dict):
            raise RolloutError("rollout-bad", "targets must be null or an object")
        n = sum(len(_names(targets[k], "targets." + k)) for k in ("boards", "groups", "devices") if k in targets)
        if n > MAX_NAMES:
            raise RolloutError("rollout-bad", f"targets name more than {MAX_NAMES} names")
    if len(_names(body.get("exclude") or [], "exclude")) > MAX_NAMES:
        raise RolloutError("rollout-bad", f"exclude names more than {MAX_NAMES} devices")
    if body.get("window") is not None:
        check_window(body["window"])
    return body


def build(release: str, version: str, rollout: str, issued: int, expires: int, stages: list[dict], *,
          halted: str | None = None, targets: dict | None = None, exclude: list[str] | None = None,
          window: dict | None = None) -> dict:
    return check({"schema": SCHEMA, "release": release, "version": version, "rollout": rollout,
                  "issued": int(issued), "expires": int(expires), "stages": stages, "halted": halted,
                  "targets": targets, "exclude": list(exclude or []), "window": window})


def sign(body: dict, key) -> bytes:
    """The DSSE envelope of `body`, signed by the rollout key; refused if it would not fit a device."""
    env = dsse.sign(json.dumps(check(body), separators=(",", ":")).encode(), [key], PAYLOAD_TYPE)
    if len(env) > MAX_BYTES:
        raise RolloutError("rollout-bad", f"the signed document is {len(env)} bytes; devices read at most {MAX_BYTES}",
                           hint="name fewer devices in targets or exclude (use groups)")
    return env


def open_document(envelope: bytes, trusted: list) -> dict:
    """The checked body of a rollout envelope signed by one of `trusted` (rollout-role keys)."""
    if len(envelope) > MAX_BYTES:
        raise RolloutError("rollout-bad", f"rollout.json is {len(envelope)} bytes, more than {MAX_BYTES}")
    try:
        body = dsse.verify(envelope, trusted, PAYLOAD_TYPE, "rollout.json")
    except dsse.EnvelopeError as e:
        code = {"unknown-key": "rollout-unknown-key", "bad-signature": "rollout-bad-signature"}.get(e.code, "rollout-bad")
        raise RolloutError(code, str(e), e.hint) from None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise RolloutError("rollout-bad", "the signed body is not JSON") from None
    return check(doc)


# ---- the next `issued` -----------------------------------------------------------------------

ISSUED_SLACK_S = 86400   # how far ahead of the signer's clock `issued` may be pushed by the previous one
ISSUED_MAX = 2 ** 40 - 1


def previous_issued(envelope: bytes | None, pub) -> tuple[dict | None, str | None]:
    """(the previous document's body, None) if `envelope` verifies with the signer's own public
    key; (None, a warning) if it does not (its `issued` is not taken: anyone who can write the
    file could otherwise pin `issued` far ahead); (None, None) if there is none."""
    if envelope is None:
        return None, None
    try:
        return open_document(envelope, [pub]), None
    except RolloutError as e:
        return None, (f"warning: the rollout.json on disk does not verify with this rollout key ({e.code}): "
                      "its issued is ignored")


def next_issued(last: int | None, now: float, *, halt: bool, slack: int = ISSUED_SLACK_S) -> tuple[int, str | None]:
    """(issued, a warning or None): max(now, last + 1), strictly increasing. Refused
    (RolloutError "issued-ahead") when that is more than `slack` ahead of `now` (the clock, or
    the previous document, is wrong), except for a halt, which is always signed (last + 1)."""
    now = int(now)
    issued = max(now, (last or 0) + 1)
    if issued - now <= slack:
        return issued, None
    ahead = f"the previous document was issued {issued - 1 - now} s after this clock's now"
    if halt:
        return issued, (f"warning: {ahead}; the halt is signed with issued = previous + 1 anyway (a halt must "
                        "always get out): check this clock and the previous document")
    raise RolloutError("issued-ahead", f"{ahead} (more than the {slack} s allowed): signing would push issued "
                       "that far ahead for good",
                       hint="either this clock is wrong (fix it: NTP) or the previous document is (a clock that once "
                            "jumped ahead signed it); a halt is still signed. To start over, sign with a new rollout "
                            "key that devices trust, or remove the bad document once devices no longer hold it")


# ---- where a device stands -----------------------------------------------------------------

def bucket(device_id: str, release: str) -> int:
    """First 32 bits of SHA-256(device id ‖ the release digest's 32 bytes)."""
    return int.from_bytes(hashlib.sha256(device_id.encode() + bytes.fromhex(release)).digest()[:4], "big")


def in_share(b: int, share_bp: int) -> bool:
    return b * FULL_BP < share_bp << 32


def share_at(stages: list[dict], now: int) -> int:
    share = 0
    for s in stages:
        if s["at"] <= now:
            share = s["share_bp"]
    return share


def jitter(b: int, jitter_s: int) -> int:
    return (b % JITTER_PRIME) % (jitter_s + 1)


def targeted(doc: dict, device_id: str, board: str, groups: list[str]) -> bool:
    t = doc.get("targets") or {}
    if t.get("boards") and board not in t["boards"]:
        return False
    if t.get("groups") or t.get("devices"):
        return device_id in (t.get("devices") or []) or any(g in (t.get("groups") or []) for g in groups)
    return True


# ---- maintenance windows --------------------------------------------------------------------

_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6))


def parse_cron(text) -> tuple[frozenset, ...]:
    """The five fields of `M H DOM MON DOW` as sets, plus whether DOM and DOW were restricted."""
    # ASCII only: MicroPython's int() and split() (the device's, ota/window.py) know no other digits
    # and spaces
    fields = text.split() if isinstance(text, str) and text.isascii() else []
    if len(fields) != 5:
        raise RolloutError("rollout-bad", f"window cron {text!r} must have five fields: minute hour day month weekday",
                           hint='e.g. "0 2 * * *" (every day at 02:00)')
    out = []
    for f, (lo, hi) in zip(fields, _CRON_RANGES):
        vals = set()
        for part in f.split(","):
            rng, _, step = part.partition("/")
            try:
                step_n = int(step) if step else 1
                if rng == "*":
                    a, b = lo, hi
                elif "-" in rng:
                    a, b = (int(x) for x in rng.split("-", 1))
                else:
                    a = b = int(rng)
            except ValueError:
                raise RolloutError("rollout-bad", f"window cron field {f!r} is not a number, range, list or step") from None
            if not (lo <= a <= b <= hi and step_n >= 1):
                raise RolloutError("rollout-bad", f"window cron field {f!r} is outside {lo}-{hi}")
            vals.update(range(a, b + 1, step_n))
        out.append(frozenset(vals))
    return tuple(out) + (fields[2][0] != "*", fields[4][0] != "*")  # Vixie cron: "*/2" is unrestricted


def _day_matches(cron, days: int) -> bool:
    # days since 1970-01-01 (a Thursday) in local time
    import datetime
    d = datetime.date(1970, 1, 1) + datetime.timedelta(days=days)
    dom_ok, dow_ok = d.day in cron[2], (d.weekday() + 1) % 7 in cron[4]
    if d.month not in cron[3]:
        return False
    if cron[5] and cron[6]:
        return dom_ok or dow_ok
    return dom_ok and dow_ok


def window_open(window: dict, now: int, jit: int = 0) -> bool:
    """True when `now` (Unix seconds) is inside the window, opened `jit` seconds late."""
    cron = parse_cron(window["cron"])
    local = now - jit + window.get("utc_offset_min", 0) * 60
    dur = window["duration_s"]
    day = local // 86400
    for d in range(day - (dur // 86400) - 1, day + 1):
        if not _day_matches(cron, d):
            continue
        for h in cron[1]:
            for m in cron[0]:
                start = d * 86400 + h * 3600 + m * 60
                if start <= local < start + dur:
                    return True
    return False


# ---- the device's decision, for the host ---------------------------------------------------

def decide(doc: dict, device_id: str, *, board: str, groups: list[str] = (), release: str,
           now: int, clock_known: bool, seen: int = 0, device_window: dict | None = None) -> str | None:
    """None if the device installs `release` now under `doc` (signature already checked); else
    the held code, in docs/rollout.md's order. `now` is the device's best time (at least `seen`)."""
    if doc["release"] != release:
        return "rollout-other-release"
    if doc["issued"] < seen:
        return "rollout-replayed"
    now = max(now, seen, doc["issued"]) if not clock_known else max(now, seen)
    if doc["expires"] <= now:
        return "rollout-expired"
    if doc.get("halted") is not None:
        return "rollout-halted"
    b = bucket(device_id, release)
    if (not targeted(doc, device_id, board, list(groups)) or device_id in (doc.get("exclude") or [])
            or not in_share(b, share_at(doc["stages"], now))):
        return "not-in-rollout"
    windows = [w for w in (doc.get("window"), device_window) if w]
    if windows and not clock_known:
        return "no-clock"
    for w in windows:
        if not window_open(w, now, jitter(b, w.get("jitter_s", 0))):
            return "outside-window"
    return None
