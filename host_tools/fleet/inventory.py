"""The inventory, derived from what devices said (never typed in): plain functions over a device
row, the device's update attempts and one report at a time. No I/O: storage loads the rows,
calls apply() for each report of a batch in order and writes back what it returns.

A device row holds the registration (secret, cohort, interval_s) and what the reports say:
version, slot, slots, board, chip, last event and code, last result, last seen, boots, heap, the
release waiting for its confirmation (pending), and a status. An attempt row holds one device's
history with one release (target version): started, installed, confirmed, rolled back, refused,
failed, and when; monitor.py computes the statistics from those rows.
"""
from __future__ import annotations

# A device that said nothing for GRACE_FACTOR check intervals plus GRACE_SLACK_S seconds is
# silent; silent while a release waits for its confirmation, it is failed-silent. One missed
# check (Wi-Fi down for an hour, a batch lost) is normal; two in a row after an install are not.
# The slack covers the reboot and the health check of the new image for short intervals.
GRACE_FACTOR = 2.0
GRACE_SLACK_S = 120.0
DEFAULT_INTERVAL_S = 3600
DEFAULT_COHORT = "default"

STATUSES = ("unseen", "ok", "updating", "pending-confirm", "failed-silent", "rolled-back", "refused",
            "failed", "no-memory")
# The events that end (or are) a step of an update; last_result is the latest of them. A check
# that finds nothing to do (checked, up-to-date) changes neither: a device that rolled back stays
# `rolled-back` (running its old version, which is fine) until its next update.
RESULTS = ("installed", "confirmed", "rolled-back", "refused", "failed", "no-memory")
_STATUS_OF = {"downloading": "updating", "installed": "pending-confirm", "confirmed": "ok",
              "rolled-back": "rolled-back", "refused": "refused", "failed": "failed", "no-memory": "no-memory"}
OUTCOMES = ("started", "installed", "confirmed", "rolled-back", "refused", "failed", "failed-silent")

DEVICE_FIELDS = ("id", "secret", "cohort", "interval_s", "registered_at", "board", "chip", "version", "slot",
                 "slots", "last_event", "last_code", "last_detail", "last_result", "last_error", "last_seen",
                 "first_seen", "last_n", "boots", "reset", "heap", "target", "pending", "pending_since",
                 "status", "silent_at", "reports", "dropped", "source")
ATTEMPT_FIELDS = ("device", "release", "board", "cohort", "from_version", "started_at", "installed_at",
                  "confirmed_at", "rolled_back_at", "ended_at", "outcome", "code", "last_at", "tries")


def silent_after(interval_s: float | None) -> float:
    return GRACE_FACTOR * float(interval_s or DEFAULT_INTERVAL_S) + GRACE_SLACK_S


def new_device(device_id: str, secret: str | None, at: float, *, board=None, interval_s=None,
               cohort=None) -> dict:
    row = dict.fromkeys(DEVICE_FIELDS)
    row.update(id=device_id, secret=secret, registered_at=at if secret else None, board=board,
               interval_s=int(interval_s or DEFAULT_INTERVAL_S), cohort=cohort or DEFAULT_COHORT,
               status="unseen", last_n=0, reports=0, dropped=0)
    return row


def status_at(row: dict, now: float) -> str:
    """The status to show at `now`: failed-silent is a matter of time, not of a report."""
    if row.get("status") == "pending-confirm" and row.get("silent_at") is not None and row["silent_at"] < now:
        return "failed-silent"
    return row.get("status") or "unseen"


def is_silent(row: dict, now: float) -> bool:
    return row.get("silent_at") is not None and row["silent_at"] < now


def new_attempt(device: dict, release: str, at: float, board) -> dict:
    a = dict.fromkeys(ATTEMPT_FIELDS)
    a.update(device=device["id"], release=release, board=board or device.get("board"),
             cohort=device.get("cohort") or DEFAULT_COHORT, from_version=device.get("version"),
             started_at=at, outcome="started", last_at=at, tries=0)
    return a


def attempt_release(device: dict, rep: dict) -> str | None:
    """Which release a report is about: its target; a confirmation is about the version that
    confirmed; a rollback (reported by the image that came back) about the pending one."""
    ev = rep["event"]
    if ev == "confirmed":
        return rep.get("version") or rep.get("target") or device.get("pending")
    if ev == "rolled-back":
        return rep.get("target") or device.get("pending")
    if ev in ("downloading", "installed", "refused", "failed", "no-memory"):
        return rep.get("target")
    return None


def apply(device: dict, attempts: dict, rep: dict, at: float) -> tuple[dict, dict | None]:
    """One report (or log announce) received at `at` applied to the device row and its attempts
    ({release: row}). Returns the new device row and the attempt row it changed (or None).
    What a report says about the device's present (version, slot, ...) counts only if it is not
    older than what we have (log lines can be imported late); history is always kept."""
    d = dict(device)
    ev = rep["event"]
    newest = d.get("last_seen") is None or at >= d["last_seen"]
    if rep.get("n"):
        d["last_n"] = max(d.get("last_n") or 0, rep["n"])
        d["reports"] = (d.get("reports") or 0) + 1
        d["dropped"] = (d.get("dropped") or 0) + (rep.get("dropped") or 0)
    d["first_seen"] = at if d.get("first_seen") is None else min(d["first_seen"], at)
    if ev == "announce":  # a manifest fetch: the device's own words are in result (event[:code])
        ev_res, _, code = (rep.get("result") or "").partition(":")
        ev_eff = ev_res if ev_res in _STATUS_OF or ev_res in ("checked", "boot") else None
        code = code or None
    else:
        ev_eff, code = ev, rep.get("code")
    if newest:
        d["last_seen"] = at
        d["silent_at"] = at + silent_after(d.get("interval_s"))
        d["source"] = rep.get("source") or "report"
        for k in ("version", "slot", "slots", "board", "chip", "boots", "reset", "heap"):
            if rep.get(k) is not None:
                d[k] = rep[k]
        d["last_event"], d["last_code"], d["last_detail"] = ev, code, rep.get("detail")
        if rep.get("target") is not None:
            d["target"] = rep["target"]
        if ev_eff in RESULTS:
            d["last_result"], d["last_error"] = ev_eff, code
        if ev_eff in _STATUS_OF:
            d["status"] = _STATUS_OF[ev_eff]
        elif d.get("status") in (None, "unseen"):
            d["status"] = "ok"
        if ev_eff == "installed":
            d["pending"], d["pending_since"] = rep.get("target"), at
        elif ev_eff in ("confirmed", "rolled-back"):
            d["pending"], d["pending_since"] = None, None
        elif d.get("pending") and rep.get("version") == d["pending"] and ev_eff in ("up-to-date", "checked"):
            # the new image runs and checks for updates: it was confirmed (the report of it lost)
            d["pending"], d["pending_since"], d["status"] = None, None, "ok"
    if ev == "announce":
        return d, None
    release = attempt_release(device, rep)
    if release is None:
        return d, None
    a = dict(attempts.get(release) or new_attempt(device, release, at, rep.get("board")))
    a["last_at"] = max(a.get("last_at") or at, at)
    if rep.get("board"):
        a["board"] = rep["board"]
    if ev == "downloading":
        a["tries"] = (a.get("tries") or 0) + 1
        if a["outcome"] in ("refused", "failed"):  # a new try after a failure
            a.update(outcome="started", code=None, ended_at=None)
    elif ev == "installed":
        a.update(installed_at=at, outcome="installed", code=None, ended_at=None)
    elif ev == "confirmed":
        a.update(confirmed_at=at, outcome="confirmed", ended_at=at, code=None)
    elif ev == "rolled-back":
        a.update(rolled_back_at=at, outcome="rolled-back", ended_at=at, code=rep.get("code"))
    elif ev in ("refused", "failed", "no-memory"):
        if a["outcome"] not in ("confirmed", "rolled-back"):
            a.update(outcome="refused" if ev == "refused" else "failed", ended_at=at, code=rep.get("code") or ev)
    return d, a


def attempt_outcome(a: dict, device: dict | None, now: float) -> str:
    """An attempt's outcome at `now`: an install that never confirmed on a device that went
    silent is failed-silent."""
    if a["outcome"] == "installed" and device is not None and device.get("pending") == a["release"] \
            and status_at(device, now) == "failed-silent":
        return "failed-silent"
    return a["outcome"]


def derive(registration: dict, reports: list[tuple[float, dict]]) -> tuple[dict, dict]:
    """The whole inventory of one device from its reports [(received_at, report)] in order:
    what storage keeps up to date one batch at a time (tests check they agree)."""
    d, attempts = dict(registration), {}
    for at, rep in reports:
        d, a = apply(d, attempts, rep, at)
        if a is not None:
            attempts[a["release"]] = a
    return d, attempts
