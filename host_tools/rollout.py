"""`mpota rollout`: sign and show a release's rollout document by hand (docs/rollout.md).

For static hosting without a fleet server: a person (or a cron job) signs RELEASE_DIR/rollout.json
with the rollout key, beside the release's manifest.json, and re-signs it to advance, pause or
halt. The document's rules are rolloutdoc's; this module adds what signing by hand needs: the
text forms of times, durations, stages and windows, `issued` kept strictly increasing across
re-signs, the release key refused as a rollout key, an atomic write, and a look at a document
(local or on a server) and at what one device would do under it.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import MpotaError, keys, read_input, rolloutdoc
from .release import MANIFEST_MAX, MANIFEST_NAME

ROLLOUT_NAME = "rollout.json"
DEFAULT_VALID_S = 7 * 86400
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
TIME_FORMS = "2026-12-01T00:00Z, 2026-12-01, +1d, +6h, now or Unix seconds"


class RolloutSignError(MpotaError):
    """A rollout that cannot be signed as asked (bad text, a missing release, the wrong key)."""

    def __init__(self, code: str, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.code = code


# ---- text forms -------------------------------------------------------------------------------

def parse_duration(text: str) -> int:
    """'7d', '2h', '15m', '90s', '1w' or plain seconds -> seconds; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 2h, 7d or 1w")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_time(text: str, now: int) -> int:
    """A moment as Unix seconds: ISO 8601 with a zone (Z or +01:00; a date alone is 00:00 UTC),
    '+DURATION' after `now`, 'now', or Unix seconds. ValueError otherwise."""
    t = str(text).strip()
    if t == "now":
        return now
    if t.startswith("+"):
        return now + parse_duration(t[1:])
    if t.isdigit():
        return int(t)
    iso = t[:-1] + "+00:00" if t[-1:] in "Zz" and t else t
    try:
        when = datetime.datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(f"{text!r} is not a time ({TIME_FORMS})") from None
    if len(t) == 10:  # a date alone: midnight UTC
        when = when.replace(tzinfo=datetime.timezone.utc)
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone: add Z for UTC (2026-12-01T02:00Z) or an offset (+01:00)")
    return int(when.timestamp())


def parse_utc_offset(text: str) -> int:
    """'+01:00', '-05:30', '+2', 'Z' -> minutes east of UTC; ValueError otherwise."""
    t = str(text).strip()
    if t in ("Z", "z", "0", "UTC"):
        return 0
    m = re.fullmatch(r"([+-])(\d{1,2})(?::?(\d{2}))?", t)
    if not m:
        raise ValueError(f"{text!r} is not a UTC offset like +01:00 or -05:30")
    minutes = int(m.group(2)) * 60 + int(m.group(3) or 0)
    minutes = -minutes if m.group(1) == "-" else minutes
    if not -720 <= minutes <= 840:
        raise ValueError(f"{text!r}: a UTC offset is from -12:00 to +14:00")
    return minutes


def parse_share(text: str) -> int:
    """A share in percent ('10', '0.5', '10%') -> basis points; ValueError otherwise."""
    t = str(text).strip().removesuffix("%")
    try:
        pct = float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a share in percent (0 to 100, e.g. 1, 0.5, 10)") from None
    if not 0 <= pct <= 100 or round(pct * 100, 6) != int(round(pct * 100)):
        raise ValueError(f"{text!r}: a share is 0 to 100 percent, in steps of 0.01")
    return int(round(pct * 100))


def parse_stages(text: str, now: int) -> list[dict]:
    """'1@2026-12-01T00:00Z,10@+1d,100@+3d' -> stages ({at, share_bp}); PERCENT alone starts now.
    Relative times count from `now` (the signing time). RolloutSignError with a hint otherwise."""
    hint = 'e.g. --stages "1@2026-12-01T00:00Z,10@+1d,100@+3d" (percent@time; relative times count from now)'
    stages = []
    for item in [i.strip() for i in str(text).split(",")]:
        if not item:
            raise RolloutSignError("bad-stages", f"--stages {text!r} has an empty stage", hint=hint)
        share, _, when = item.partition("@")
        try:
            stages.append({"at": parse_time(when, now) if when else now, "share_bp": parse_share(share)})
        except ValueError as e:
            raise RolloutSignError("bad-stages", f"stage {item!r}: {e}", hint=hint) from None
    if len(stages) > rolloutdoc.MAX_STAGES:
        raise RolloutSignError("bad-stages", f"{len(stages)} stages; a document holds at most {rolloutdoc.MAX_STAGES}",
                               hint=hint)
    for a, b in zip(stages, stages[1:]):
        if b["at"] < a["at"]:
            raise RolloutSignError("bad-stages", f"stage {_pct(b['share_bp'])} starts at {iso(b['at'])}, before the "
                                   f"stage before it ({iso(a['at'])}): stages go in time order", hint=hint)
    return stages


def make_window(cron: str, duration_s: int | None, utc_offset_min: int = 0, jitter_s: int = 0) -> dict:
    """A checked maintenance window (rolloutdoc.check_window); RolloutSignError with a hint."""
    if duration_s is None:
        raise RolloutSignError("bad-window", "--window needs --window-duration (how long the window stays open)",
                               hint='e.g. --window "0 2 * * *" --window-duration 2h')
    try:
        return rolloutdoc.check_window({"cron": cron, "duration_s": duration_s, "utc_offset_min": utc_offset_min,
                                        "jitter_s": jitter_s})
    except rolloutdoc.RolloutError as e:
        raise RolloutSignError("bad-window", str(e), hint=e.hint or "--window-duration is 1m to 24h, --jitter at "
                               "most 24h, --utc-offset -12:00 to +14:00; cron is M H DOM MON DOW, e.g. "
                               '"0 2 * * *" or "30 1 * * 1-5"') from None


def iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def human_duration(s: int) -> str:
    for unit, n in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n and s % n == 0:
            return f"{s // n}{unit}"
    return f"{s}s"


def _pct(bp: int) -> str:
    return f"{bp / 100:g} %"


# ---- reading a release directory ----------------------------------------------------------------

def envelope_payload(data: bytes) -> dict | None:
    """The JSON body of a DSSE envelope without checking any signature (to read a version or a
    previous `issued`), else None."""
    try:
        body = json.loads(base64.b64decode(json.loads(data)["payload"], validate=True))
        return body if isinstance(body, dict) else None
    except (ValueError, KeyError, TypeError, RecursionError):
        return None


def read_manifest(release_dir: Path) -> tuple[bytes, dict]:
    """(manifest.json's bytes, its body unverified); RolloutSignError if there is none."""
    release_dir = Path(release_dir)
    if not release_dir.is_dir():
        raise RolloutSignError("no-release", f"{release_dir} is not a directory",
                               hint="pass the release directory `mpota release --out` wrote")
    data = read_input(release_dir / MANIFEST_NAME, "the release's manifest",
                      hint=f"sign the release first: mpota release FIRMWARE.bin --key keys/release --out {release_dir}",
                      error=lambda m, hint: RolloutSignError("no-release", m, hint))
    body = envelope_payload(data) if len(data) <= MANIFEST_MAX else None
    if body is None or not isinstance(body.get("version"), str):
        raise RolloutSignError("no-release", f"{release_dir / MANIFEST_NAME} is not a signed mpota manifest",
                               hint="pass the release directory `mpota release --out` wrote")
    return data, body


def release_digest(manifest_bytes: bytes) -> str:
    """The fleet's name for a release: SHA-256 of its manifest.json envelope bytes."""
    return hashlib.sha256(manifest_bytes).hexdigest()


def check_roles(manifest_bytes: bytes, rollout_key) -> None:
    """Refuse a rollout key that signed the release: the two roles need two keys."""
    kid = keys.keyid(rollout_key.public_key())
    try:
        signers = [s.get("keyid") for s in json.loads(manifest_bytes)["signatures"] if isinstance(s, dict)]
    except (ValueError, KeyError, TypeError):
        signers = []
    if kid in signers:
        raise RolloutSignError("same-key", f"the rollout key ({kid}) is the key that signed this release's "
                               "manifest.json: the release key and the rollout key must be two keys",
                               hint="make a rollout key with `mpota keygen keys/rollout`, give devices its .pub as "
                                    "their rollout role (docs/rollout.md, 'Keys and their roles'), and keep the "
                                    "release key offline")


# ---- signing ------------------------------------------------------------------------------------

@dataclass
class Signed:
    path: Path
    doc: dict
    envelope: bytes
    keyid: str
    previous_issued: int | None
    notes: list[str] = field(default_factory=list)


def sign(release_dir: Path, key, *, now: int | None = None, stages: str | None = None, share: str | None = None,
         valid_for: int | None = None, expires: str | None = None, halted: str | None = None,
         targets: dict | None = None, exclude: list[str] | None = None, window: dict | None = None,
         rollout_id: str | None = None) -> Signed:
    """Sign RELEASE_DIR/rollout.json for the release in RELEASE_DIR with the rollout `key`,
    write it atomically and verify what was written. `stages` (text) or `share` (percent);
    neither with `halted` is share 0. `expires` is a time (text; relative to issued) or
    `valid_for` seconds after issued (default 7 days). `issued` is the later of now and the
    previous document's issued + 1."""
    release_dir = Path(release_dir)
    now = int(time.time()) if now is None else int(now)
    manifest_bytes, manifest = read_manifest(release_dir)
    check_roles(manifest_bytes, key)
    digest = release_digest(manifest_bytes)
    path = release_dir / ROLLOUT_NAME
    notes = []
    # the previous issued only from a document this key signed: a file anyone wrote could pin it
    prev, warn = rolloutdoc.previous_issued(path.read_bytes() if path.is_file() else None, key.public_key())
    if warn:
        notes.append(warn)
    prev_issued = prev["issued"] if prev else None
    try:
        issued, warn = rolloutdoc.next_issued(prev_issued, now, halt=halted is not None)
    except rolloutdoc.RolloutError as e:
        raise RolloutSignError(e.code, str(e), e.hint) from None
    if warn:
        notes.append(warn)
    elif prev_issued is not None and prev_issued >= now:
        notes.append(f"issued {iso(issued)}: one second after the previous document's, which is ahead of this "
                     "clock (issued only goes up: devices refuse an older one as a replay)")

    if stages is not None and share is not None:
        raise RolloutSignError("bad-stages", "give --share or --stages, not both",
                               hint="--share 10 is --stages 10@now")
    if stages is not None:
        stage_list = parse_stages(stages, now)
    elif share is not None:
        try:
            stage_list = [{"at": now, "share_bp": parse_share(share)}]
        except ValueError as e:
            raise RolloutSignError("bad-stages", f"--share: {e}", hint="e.g. --share 10 (10 % of the devices)") from None
    elif halted is not None:
        stage_list = [{"at": now, "share_bp": 0}]
    else:
        raise RolloutSignError("bad-stages", "say who may install: --share PERCENT or --stages, or --halt REASON",
                               hint='e.g. --share 10, or --stages "1@now,10@+1d,100@+3d"')

    if expires is not None and valid_for is not None:
        raise RolloutSignError("bad-expiry", "give --expires or --valid-for, not both")
    if expires is not None:
        try:
            exp = (issued + parse_duration(expires)) if re.fullmatch(r"\s*\d+\s*[smhdw]\s*", expires) else \
                parse_time(expires, issued)
        except ValueError as e:
            raise RolloutSignError("bad-expiry", f"--expires: {e}",
                                   hint="a duration after issued (7d, 36h) or a time (2026-12-31T00:00Z)") from None
    else:
        exp = issued + (DEFAULT_VALID_S if valid_for is None else valid_for)
    if halted is not None:
        exp = min(exp, rolloutdoc.ISSUED_MAX)  # a halt is signable while issued fits at all
    if exp <= issued:
        raise RolloutSignError("bad-expiry", f"the document would expire at {iso(exp)}, not after it is issued "
                               f"({iso(issued)})", hint="give a later --expires, e.g. 7d")
    late = [s for s in stage_list if s["at"] >= exp]
    if late:
        notes.append(f"{len(late)} stage(s) start after the document expires ({iso(exp)}): re-sign before then "
                     "to reach them")

    if rollout_id is None:
        if prev and prev.get("release") == digest and isinstance(prev.get("rollout"), str):
            rollout_id = prev["rollout"]
        else:
            rollout_id = f"r-{time.strftime('%Y%m%d', time.gmtime(now))}-{digest[:8]}"
    version = manifest["version"]
    try:
        doc = rolloutdoc.build(digest, version[:64], rollout_id, issued, exp, stage_list, halted=halted,
                               targets=targets or None, exclude=exclude, window=window)
        envelope = rolloutdoc.sign(doc, key)
    except rolloutdoc.RolloutError as e:
        raise RolloutSignError(e.code, str(e), hint=e.hint or "see docs/rollout.md, 'The document'") from None

    tmp = path.with_name(f".{ROLLOUT_NAME}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(envelope)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    verify_written(release_dir, key.public_key(), doc)
    return Signed(path, doc, envelope, keys.keyid(key.public_key()), prev_issued, notes)


def verify_written(release_dir: Path, pub, expected: dict) -> dict:
    """Read RELEASE_DIR/rollout.json back: signed by `pub`, the body signed, naming manifest.json."""
    data = (Path(release_dir) / ROLLOUT_NAME).read_bytes()
    doc = rolloutdoc.open_document(data, [pub])
    manifest_bytes, _ = read_manifest(release_dir)
    if doc != expected or doc["release"] != release_digest(manifest_bytes):
        raise RolloutSignError("verify-failed", f"{Path(release_dir) / ROLLOUT_NAME} does not read back as written "
                               "(another signer or release at the same time?)", hint="sign again")
    return doc


# ---- showing --------------------------------------------------------------------------------

def load(source: str, timeout: float = 30) -> tuple[bytes, bytes | None, str]:
    """(rollout.json's bytes, manifest.json's bytes or None, where) from a release directory, a
    file, or an http(s) URL of a release directory."""
    if re.match(r"^https?://", source):
        from . import fetch
        base = source
        if base.rstrip("/").endswith("/" + ROLLOUT_NAME):
            base = base.rstrip("/")[:-len(ROLLOUT_NAME)]
        base = fetch.check_base_url(base)
        doc = fetch.get(fetch.join(base, ROLLOUT_NAME), rolloutdoc.MAX_BYTES, timeout)
        if doc is None:
            raise RolloutSignError("rollout-missing", f"{fetch.join(base, ROLLOUT_NAME)}: not found (404)",
                                   hint="sign one with `mpota rollout sign RELEASE_DIR --key keys/rollout` and "
                                        "publish it beside manifest.json")
        return doc, fetch.get(fetch.join(base, MANIFEST_NAME), MANIFEST_MAX, timeout), base
    p = Path(source)
    if p.is_dir():
        f = p / ROLLOUT_NAME
        if not f.is_file():
            raise RolloutSignError("rollout-missing", f"{p} has no {ROLLOUT_NAME}",
                                   hint=f"sign one: mpota rollout sign {p} --key keys/rollout --share 10")
    else:
        f, p = p, p.parent
    doc = read_input(f, "rollout document", error=lambda m, hint: RolloutSignError("rollout-missing", m, hint))
    m = p / MANIFEST_NAME
    return doc, (m.read_bytes() if m.is_file() else None), str(f)


@dataclass
class Shown:
    doc: dict
    where: str
    verified: bool            # signed by one of the --pub keys
    release_matches: bool | None  # names the manifest beside it (None: no manifest found)
    manifest: dict | None
    share_bp_now: int
    device: dict | None = None


def show(source: str, trusted: list | None = None, *, now: int | None = None, device: str | None = None,
         board: str | None = None, groups: list[str] = (), timeout: float = 30) -> Shown:
    """The rollout document at `source` (verified with `trusted`, when given), and with `device`
    what that device would do now (rolloutdoc.decide, as a device with a set clock)."""
    now = int(time.time()) if now is None else int(now)
    data, manifest_bytes, where = load(source, timeout)
    if trusted:
        doc, verified = rolloutdoc.open_document(data, trusted), True
    else:
        body = envelope_payload(data) if len(data) <= rolloutdoc.MAX_BYTES else None
        if body is None:
            raise rolloutdoc.RolloutError("rollout-bad", f"{where}: not a rollout document (DSSE envelope)")
        doc, verified = rolloutdoc.check(body), False
    manifest = envelope_payload(manifest_bytes) if manifest_bytes else None
    matches = None if manifest_bytes is None else doc["release"] == release_digest(manifest_bytes)
    out = Shown(doc, where, verified, matches, manifest, rolloutdoc.share_at(doc["stages"], now))
    if device is not None:
        release = release_digest(manifest_bytes) if manifest_bytes else doc["release"]
        board = board or (manifest or {}).get("board") or ""
        b = rolloutdoc.bucket(device, doc["release"])
        w = doc.get("window")
        code = rolloutdoc.decide(doc, device, board=board, groups=list(groups), release=release, now=now,
                                 clock_known=True)
        out.device = {"id": device, "board": board, "groups": list(groups), "at": now, "bucket": b,
                      "bucket_share_bp": b * rolloutdoc.FULL_BP // (1 << 32),
                      "in_share": rolloutdoc.in_share(b, out.share_bp_now),
                      "targeted": rolloutdoc.targeted(doc, device, board, list(groups)),
                      "excluded": device in (doc.get("exclude") or []),
                      "jitter_s": rolloutdoc.jitter(b, w.get("jitter_s", 0)) if w else 0,
                      "decision": code, "installs": code is None}
    return out


def describe(doc: dict, now: int) -> list[str]:
    """The document in lines a person reads: release, version, share now, stages, expiry, targets, window."""
    lines = [f"release {doc['release']} (SHA-256 of manifest.json), version {doc['version']}",
             f"rollout {doc['rollout']}, issued {iso(doc['issued'])}, expires {iso(doc['expires'])}"
             + (" (EXPIRED)" if doc["expires"] <= now else f" (in {_ago(doc['expires'] - now)})")]
    share = rolloutdoc.share_at(doc["stages"], now)
    if doc.get("halted") is not None:
        lines.append(f"HALTED: {doc['halted']} (no device installs)")
    lines.append(f"share now {_pct(share)} ({share} bp); stages: "
                 + ", ".join(f"{_pct(s['share_bp'])} from {iso(s['at'])}" for s in doc["stages"]))
    t = doc.get("targets") or {}
    tgt = "; ".join(f"{k} {', '.join(t[k])}" for k in ("boards", "groups", "devices") if t.get(k))
    lines.append(f"targets: {tgt or 'all devices'}" + (f"; excluded: {', '.join(doc['exclude'])}"
                                                        if doc.get("exclude") else ""))
    w = doc.get("window")
    if w:
        off = w.get("utc_offset_min", 0)
        lines.append(f"window: \"{w['cron']}\" for {human_duration(w['duration_s'])}, UTC{'+' if off >= 0 else '-'}"
                     f"{abs(off) // 60:02d}:{abs(off) % 60:02d}, jitter up to {human_duration(w.get('jitter_s', 0))}")
    else:
        lines.append("window: none (any time)")
    return lines


def _ago(s: int) -> str:
    if s >= 2 * 86400:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{max(s, 0) // 60} min"
