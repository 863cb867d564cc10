"""Acting on rollouts (docs/rollout.md "Fleet server"): start one, pause, resume or halt it by
hand, and tick(): evaluate the active rollouts with the policy (rollout.py) and record what it
decides; sign RELEASE_DIR/rollout.json again (temp file, then os.replace) when the stage
advances, the rollout halts, the penalty box grows, half of the document's validity passed, or
the file on disk is not the database's document (e.g. written before a commit that failed).

Every change is one database transaction (storage.change_rollout) that locks the rollout's row
and the `issued` counter; the file is replaced inside it, so two signers never interleave and
`issued` only grows: max(now, last + 1), with `last` the highest of the counter and the issued
of the file on disk (taken only if it verifies with the rollout key); refused when that is more
than a day ahead of now, except for a halt (rolloutdoc.next_issued). With several server processes on one PostgreSQL, a lease in the database
(storage.claim) lets one of them evaluate; admin actions can come through any of them.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import socket
import stat
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .. import MpotaError, keys, rolloutdoc
from . import monitor, rollout, views

DOCUMENT_NAME = "rollout.json"
MANIFEST_NAME = "manifest.json"
LEASE = "rollouts"


# ---- keys, releases, files -------------------------------------------------------------------

def load_key(path) -> object:
    """The rollout role's private key; refused if others may read it (it can halt or widen any
    rollout) and never printed."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise MpotaError(f"cannot read the rollout key {path}: {e.strerror}",
                         hint="make one with: mpota keygen keys/rollout") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MpotaError(f"the rollout key {path} may be read by others (mode {stat.S_IMODE(mode):04o})",
                         hint=f"chmod 600 {path}")
    return keys.load_private(path)


def read_release(release_dir) -> tuple[str, str]:
    """(the manifest envelope's SHA-256, the version it names) of a release directory. The
    signature is the devices' business: the rollout key cannot make them accept anything."""
    p = Path(release_dir) / MANIFEST_NAME
    try:
        data = p.read_bytes()
    except OSError as e:
        raise MpotaError(f"cannot read {p}: {e.strerror}",
                         hint="give the directory `mpota release` wrote (it holds manifest.json)") from None
    try:
        version = json.loads(base64.b64decode(json.loads(data)["payload"]))["version"]
        if not isinstance(version, str) or not 1 <= len(version) <= 64:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise MpotaError(f"{p} is not a release manifest (a DSSE envelope naming a version)") from None
    return hashlib.sha256(data).hexdigest(), version


def file_issued(release_dir, pub=None) -> int:
    """The issued of the rollout.json on disk if it verifies with `pub` (the signer's own public
    key), else 0 (with a warning printed when a file is there but does not verify: its issued is
    not taken, or anyone who can write the file could pin issued far ahead)."""
    p = Path(release_dir) / DOCUMENT_NAME
    try:
        data = p.read_bytes()
    except OSError:
        return 0
    if pub is None:
        return 0
    prev, warn = rolloutdoc.previous_issued(data, pub)
    if warn:
        print(f"mpota fleet: {p}: {warn}", file=sys.stderr, flush=True)
    return prev["issued"] if prev else 0


def disk_document(release_dir, pub) -> dict | None:
    """The body of the rollout.json on disk if it verifies with `pub`, else None."""
    try:
        return rolloutdoc.open_document((Path(release_dir) / DOCUMENT_NAME).read_bytes(), [pub])
    except (OSError, rolloutdoc.RolloutError):
        return None


def write_document(release_dir, envelope: bytes) -> Path:
    """Replace RELEASE_DIR/rollout.json atomically: a reader sees the old file or the new one."""
    d = Path(release_dir)
    dst = d / DOCUMENT_NAME
    tmp = d / f".{DOCUMENT_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(envelope)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MpotaError(f"cannot write {dst}: {e.strerror}",
                         hint="the fleet server needs write access to the release directory") from None
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return dst


def _sign(row: dict, key, last: int, exclude: list[str], now: float) -> tuple[int, dict]:
    prev = max(last or 0, file_issued(row["path"], key.public_key()))
    halt = row["state"] == "halted"
    try:
        issued, warn = rolloutdoc.next_issued(prev, now, halt=halt)
    except rolloutdoc.RolloutError as e:
        raise MpotaError(f"rollout {row['id']}: {e}", e.hint) from None
    if warn:
        print(f"mpota fleet: rollout {row['id']}: {warn}", file=sys.stderr, flush=True)
    body = rollout.document(row, issued, exclude)
    write_document(row["path"], rolloutdoc.sign(body, key))
    return issued, body


# ---- starting and steering ------------------------------------------------------------------

def new_id(store, now: float) -> str:
    return f"r-{datetime.fromtimestamp(now, timezone.utc):%Y%m%d}-{store.next_rollout_seq()}"


def start(store, key, release_dir, config: dict, *, rollout_id: str | None = None, now: float | None = None) -> dict:
    """Record a rollout of the release in release_dir and write its first document (stage 1)."""
    if key is None:
        raise MpotaError("starting a rollout signs rollout.json: no rollout key here",
                         hint="start the server with --rollout-key FILE (or give --key with --db)")
    now = time.time() if now is None else now
    path = str(Path(release_dir).resolve())
    digest, version = read_release(path)
    cfg = rollout.check_config(config)
    rid = rollout_id or new_id(store, now)
    if not (1 <= len(rid) <= 64 and set(rid) <= rolloutdoc.ID_CHARS):
        raise MpotaError(f"rollout id {rid!r}: 1-64 of A-Z a-z 0-9 . _ : -")
    row = {"id": rid, "release": digest, "version": version, "path": path, "config": cfg, "stage": 0,
           "stage_at": [int(now)], "state": "running", "reason": None, "created_at": now, "updated_at": now,
           "ended_at": None}
    return store.create_rollout(row, lambda r, last: _sign(r, key, last, [], now))


def act(store, key, rollout_id: str, action: str, reason: str | None = None, *, now: float | None = None) -> dict:
    """pause | resume | halt by hand (recorded with the reason). A halt is signed at once when
    there is a key here; otherwise the server's next evaluation signs it."""
    now = time.time() if now is None else now
    if action not in ("pause", "resume", "halt"):
        raise ValueError(action)
    if action == "halt" and not (reason or "").strip():
        raise MpotaError("a halt needs a reason (shown to people and put in the document)",
                         hint='e.g. --reason "boot loops on line 3"')
    reason = (reason or "").strip()[:400] or None

    def change(cur, last):
        state = cur["state"]
        if state in ("halted", "complete"):
            raise MpotaError(f"rollout {rollout_id} is {state}", hint="start a new rollout for the release")
        if action == "pause" and state == "paused" or action == "resume" and state == "running":
            return None
        changes = {"updated_at": now}
        if action == "pause":
            changes.update(state="paused", reason=reason or "paused by hand")
        elif action == "resume":
            changes.update(state="running", reason=None)
        else:
            changes.update(state="halted", reason=reason, ended_at=now)
        evs = [{"at": now, "action": action, "stage": cur["stage"], "by": "admin", "reason": reason}]
        issued = None
        if action == "halt" and key is not None:
            issued, body = _sign({**cur, **changes}, key, last, (cur["document"] or {}).get("exclude", []), now)
            changes.update(document=body, issued=issued)
            evs.append({"at": now, "action": "sign", "stage": cur["stage"], "by": "admin", "reason": "halted",
                        "issued": issued})
        return changes, evs, issued
    store.change_rollout(rollout_id, None, change)
    return store.rollout(rollout_id)


# ---- evaluation --------------------------------------------------------------------------------

def _regressions(store, now: float) -> list[dict]:
    """monitor.regressions over the whole fleet (as the dashboard's anomalies have them)."""
    by_id = {d["id"]: d for d in store.fleet_rows()}
    return monitor.regressions(monitor.outcomes(store.attempts(), by_id, now))


def evaluate(store, row: dict, now: float | None = None, *, regressions=None) -> dict:
    """The policy's view of one rollout now (rollout.evaluate on what the database holds)."""
    now = time.time() if now is None else now
    devices, attempts = store.rollout_inputs(row["version"], row["release"])
    if regressions is None:
        regressions = _regressions(store, now)
    return rollout.evaluate(row, devices, attempts, now, regressions=regressions)


def step(store, key, row: dict, now: float, *, regressions=None) -> list[dict]:
    """Evaluate one rollout and act: record advance / halt / complete, sign when the document
    must change. The events recorded (none: nothing to do)."""
    if row["state"] in rollout.ACTIVE:
        ev = evaluate(store, row, now, regressions=regressions)
        decision, exclude = ev["decision"], ev["exclude"]
    else:  # halted or complete: the document stands, refreshed before it expires
        decision, exclude = {"action": "none"}, (row["document"] or {}).get("exclude", [])
    recorded: list[dict] = []

    def change(cur, last):
        act_, changes, evs = decision["action"], {}, []
        new = dict(cur)
        if act_ == "advance":
            changes = {"stage": decision["stage"], "stage_at": list(cur["stage_at"]) + [int(now)]}
        elif act_ == "halt":
            changes = {"state": "halted", "reason": decision["reason"][:400], "ended_at": now}
        elif act_ == "complete":
            changes = {"state": "complete", "ended_at": now}
        if changes:
            evs.append({"at": now, "action": act_, "stage": changes.get("stage", cur["stage"]), "by": "policy",
                        "reason": decision["reason"][:400]})
            changes["updated_at"] = now
            new.update(changes)
        wanted = rollout.content(rollout.document(new, max(int(now), 1), exclude))
        why = rollout.resign_reason(cur["document"], wanted, now)
        if why is None and key is not None and cur["document"] is not None \
                and disk_document(cur["path"], key.public_key()) != cur["document"]:
            why = "file"  # not the database's document (e.g. written before a commit that failed)
        issued = None
        if why is not None and key is not None:
            issued, body = _sign(new, key, last, exclude, now)
            changes.update(document=body, issued=issued, updated_at=now)
            evs.append({"at": now, "action": "sign", "stage": new["stage"], "by": "policy", "reason": why,
                        "issued": issued})
        if not changes:
            return None
        recorded[:] = [{"rollout": cur["id"], **e} for e in evs]
        return changes, evs, issued
    done = store.change_rollout(row["id"], row["rev"], change)
    return recorded if done is not None else []


def holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def tick(store, key, *, holder: str, ttl: float = 30.0, now: float | None = None) -> list[dict]:
    """One round over every rollout that still writes its document (the newest on each
    release directory), if this process holds the lease. Returns the events recorded, and an
    `error` entry for a rollout that could not be acted on (the rest go on)."""
    now = time.time() if now is None else now
    rows = store.rollouts()
    if not rows or not store.claim(LEASE, holder, ttl, now):
        return []
    newest: dict = {}
    for r in rows:  # newest first
        newest.setdefault(r["path"], r)
    regressions = None
    out = []
    for r in newest.values():
        if r["state"] in rollout.ACTIVE and regressions is None:
            regressions = _regressions(store, now)
        try:
            out += step(store, key, r, now, regressions=regressions)
        except (MpotaError, OSError) as e:  # e.g. its directory is gone: the others go on
            out.append({"rollout": r["id"], "action": "error", "by": "policy", "reason": str(e)})
    return out


# ---- what the API, the CLI and the dashboard show ---------------------------------------------

def summary(row: dict, now: float) -> dict:
    cfg, doc = row["config"], row["document"] or {}
    share = 0 if row["state"] == "halted" else cfg["stages_bp"][row["stage"]]
    return {"id": row["id"], "release": row["release"], "version": row["version"], "path": row["path"],
            "state": row["state"], "reason": row["reason"], "stage": row["stage"] + 1,
            "stages": len(cfg["stages_bp"]), "share_bp": share, "stages_bp": cfg["stages_bp"],
            "issued": row["issued"], "expires": doc.get("expires"), "exclude": len(doc.get("exclude") or []),
            "created_at": row["created_at"], "updated_at": row["updated_at"], "ended_at": row["ended_at"]}


def list_rollouts(store, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    return {"now": now, "rollouts": [summary(r, now) for r in store.rollouts()]}


def status(store, rollout_id: str, now: float | None = None) -> dict | None:
    """One rollout: summary, config, per-stage counts and the decision now, the signed
    document, the history (newest first)."""
    now = time.time() if now is None else now
    row = store.rollout(rollout_id)
    if row is None:
        return None
    ev = evaluate(store, row, now)
    return {"now": now, "rollout": summary(row, now), "config": row["config"], "stages": ev["stages"],
            "totals": ev["totals"], "test": ev["test"], "regression": ev["regression"],
            "decision": ev["decision"], "failures": ev["failures"][:200], "document": row["document"],
            "history": store.rollout_history(rollout_id), "alpha": rollout.ALPHA,
            "iso": {"created_at": views.iso(row["created_at"]), "updated_at": views.iso(row["updated_at"])}}
