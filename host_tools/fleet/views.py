"""The query functions that the admin API, the dashboard and `mpota fleet ... --db` share: storage
rows in, JSON-ready dicts out (times are seconds since the epoch, as floats). Secrets never leave.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

from .. import MpotaError
from . import inventory, monitor, protocol
from .storage import Store

FILTERS = ("board", "chip", "version", "status", "cohort", "seen_before", "seen_after", "silent", "silent_since")
FAILURE_EVENTS = ("rolled-back", "refused", "failed", "no-memory")


def parse_time(text) -> float:
    """A time in a filter: seconds since the epoch, or ISO 8601 (UTC unless it says otherwise)."""
    if isinstance(text, (int, float)):
        return float(text)
    t = str(text).strip()
    try:
        return float(t)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise MpotaError(f"{text!r} is not a time", hint="give seconds since the epoch or ISO 8601, "
                                                         "e.g. 2025-06-01T12:00:00Z") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def public_device(row: dict, now: float) -> dict:
    d = {k: v for k, v in row.items() if k != "secret"}
    d["registered"] = row.get("secret") is not None
    d["status"] = inventory.status_at(row, now)
    d["silent"] = inventory.is_silent(row, now)
    return d


def check_filters(f: dict) -> dict:
    out = {}
    for k, v in f.items():
        if v is None or v == "":
            continue
        if k not in FILTERS:
            raise MpotaError(f"unknown filter {k!r}", hint=f"filters: {', '.join(FILTERS)}")
        if k in ("seen_before", "seen_after", "silent_since"):
            v = parse_time(v)
            if k == "silent_since":  # heard nothing since T: last seen before T
                k, v = "seen_before", min(v, out.get("seen_before", v))
        elif k == "silent":
            v = str(v).lower() in ("1", "true", "yes")
        elif k == "status" and v not in inventory.STATUSES:
            raise MpotaError(f"unknown status {v!r}", hint=f"statuses: {', '.join(inventory.STATUSES)}")
        out[k] = v
    return out


def list_devices(store: Store, filters: dict, *, limit=1000, offset=0, now=None) -> dict:
    now = time.time() if now is None else now
    total, rows = store.devices(**check_filters(filters), now=now, limit=limit, offset=offset)
    return {"now": now, "count": total, "offset": offset, "devices": [public_device(r, now) for r in rows]}


def device_detail(store: Store, device_id: str, *, limit=100, now=None) -> dict | None:
    now = time.time() if now is None else now
    row = store.device(device_id)
    if row is None:
        return None
    return {"now": now, "device": public_device(row, now),
            "attempts": [{**a, "outcome": inventory.attempt_outcome(a, row, now)}
                         for a in store.attempts(device=device_id)],
            "events": store.events(device=device_id, limit=limit)}


def list_events(store: Store, *, device=None, event=None, before=None, limit=100) -> dict:
    if event is not None and event not in (*protocol.EVENTS, protocol.ANNOUNCE):
        raise MpotaError(f"unknown event {event!r}", hint="events: checked, up-to-date, downloading, installed, "
                                                          "confirmed, rolled-back, refused, failed, no-memory, "
                                                          "boot, announce")
    return {"events": store.events(device=device, event=event, before_id=before, limit=limit)}


class Snapshot:
    """Everything the statistics need, read once: devices, attempts (with their outcome now)
    and the last hour's activity."""

    def __init__(self, store: Store, now: float | None = None):
        self.now = time.time() if now is None else now
        self.devices = store.fleet_rows()
        self.by_id = {d["id"]: d for d in self.devices}
        self.rows = monitor.outcomes(store.attempts(), self.by_id, self.now)
        self.activity = store.activity(self.now - monitor.LOOP_WINDOW_S)
        self.counts = store.counts()

    def releases(self) -> dict:
        return {"now": self.now, "releases": monitor.release_stats(self.rows),
                "regressions": monitor.regressions(self.rows), "alpha": monitor.ALPHA}

    def anomalies(self) -> dict:
        found = [{"kind": "regression", **t} for t in monitor.regressions(self.rows) if t["alarm"]]
        found += monitor.boot_loops(self.activity)
        found += monitor.outliers(self.devices, self.rows, self.activity)
        silent = [d for d in self.devices if inventory.status_at(d, self.now) == "failed-silent"]
        found += [{"kind": "failed-silent", "device": d["id"], "version": d["version"], "board": d["board"],
                   "reason": f"installed {d['pending']} and has said nothing since "
                             f"{iso(d['last_seen'])} (silent from {iso(d['silent_at'])})"} for d in silent]
        return {"now": self.now, "alpha": monitor.ALPHA, "anomalies": found}

    def status_counts(self) -> dict:
        c = {}
        for d in self.devices:
            s = inventory.status_at(d, self.now)
            c[s] = c.get(s, 0) + 1
        return c


def releases(store: Store, now=None) -> dict:
    return Snapshot(store, now).releases()


def anomalies(store: Store, now=None) -> dict:
    return Snapshot(store, now).anomalies()


def stats(store: Store) -> dict:
    counts = store.counts()
    refusals = {k.removeprefix("refused:"): v for k, v in counts.items() if k.startswith("refused:")}
    return {"reports": counts.get("reports", 0), "duplicates": counts.get("duplicates", 0),
            "refusals": refusals, "counters": counts}
