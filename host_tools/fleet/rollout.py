"""Rollout policy (docs/rollout.md "Fleet server"): plain functions of a rollout's config and
state, the registered devices and the attempts at its release, returning per-stage counts and a
decision with its reason. No I/O: rollouts.py loads the rows, calls evaluate() and acts (records,
re-signs rollout.json); the tests and scripts/bench_rollout.py drive these functions directly.

- A device belongs to stage k when its bucket (rolloutdoc.bucket) is in stage k's share but not
  in stage k-1's. Its attempt at the release is that stage's evidence.
- Each attempt is confirmed, failed (rolled back; refused with a code that blames the release,
  i.e. not one of rolloutdoc.HELD; installed and then silent for more than silent_after_s) or
  pending (downloading, installed and still within silent_after_s, a transport failure).
- Halt: a one-sided exact binomial test of "failure rate > max_failure_rate" over every attempt
  of the rollout (failed against failed + confirmed, n of them) gives p < ALPHA / (n (n + 1))
  (alpha spending: at most ALPHA false alarms in all, however often it is evaluated), or monitor.regressions()
  raised an alarm for the release against its predecessor.
- Advance: the current stage has min_devices confirmations (or every registered, targeted device
  of the stage confirmed, when fewer exist; so a stage without devices advances) and its failure
  rate is below max_failure_rate. Advancing past the last stage completes the rollout.
- Penalty box: the devices that failed, in the order they failed, at most MAX_EXCLUDE.
"""
from __future__ import annotations

from .. import MpotaError, rolloutdoc
from . import monitor

ALPHA = monitor.ALPHA          # 0.01: the halting rule's false-alarm bound, spent over n (alpha_at)
MAX_EXCLUDE = rolloutdoc.MAX_NAMES
STATES = ("running", "paused", "halted", "complete")
ACTIVE = ("running", "paused")
DEFAULT_VALID_FOR_S = 86400
# Stages in a document: the stages reached so far, each with the time it began. A halted
# document carries one stage of share 0 instead, so no device's clock can find a share in force.
MAX_STAGES = rolloutdoc.MAX_STAGES


def check_config(cfg: dict) -> dict:
    """A rollout's config with defaults filled in, or MpotaError saying what to fix.
    {stages_bp: [int], min_devices, max_failure_rate, silent_after_s, valid_for_s, targets, window}"""
    stages = cfg.get("stages_bp")
    if (not isinstance(stages, list) or not 1 <= len(stages) <= MAX_STAGES
            or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= rolloutdoc.FULL_BP for s in stages)
            or any(b <= a for a, b in zip(stages, stages[1:]))):
        raise MpotaError(f"stages must be 1 to {MAX_STAGES} increasing shares of the fleet, each from 0.01 % to 100 %",
                         hint="e.g. --stages 1,10,50,100 (percent)")
    n = cfg.get("min_devices")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10 ** 6:
        raise MpotaError("min_devices must be a whole number from 1", hint="e.g. --min-devices 20")
    r = cfg.get("max_failure_rate")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
        raise MpotaError("max_failure_rate must be a rate above 0 and below 1", hint="e.g. --max-failure-rate 0.05 (5 %)")
    t = cfg.get("silent_after_s")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 1 <= t <= 30 * 86400:
        raise MpotaError("silent_after_s must be from 1 s to 30 days", hint="e.g. --silent-after 2h")
    v = cfg.get("valid_for_s", DEFAULT_VALID_FOR_S)
    if isinstance(v, bool) or not isinstance(v, int) or not 60 <= v <= 366 * 86400:
        raise MpotaError("valid_for_s must be whole seconds from 60 to a year", hint="e.g. --valid-for 1d")
    out = {"stages_bp": list(stages), "min_devices": n, "max_failure_rate": float(r), "silent_after_s": float(t),
           "valid_for_s": v, "targets": cfg.get("targets") or None, "window": cfg.get("window") or None}
    # the document's own rules for targets and window (rolloutdoc.check), and its size, on a
    # stand-in body as large as this rollout's can be without a penalty box
    stand_in = {"schema": rolloutdoc.SCHEMA, "release": "0" * 64, "version": "x" * 64, "rollout": "x" * 64,
                "issued": 2 ** 39, "expires": 2 ** 39 + 1, "halted": None, "targets": out["targets"], "exclude": [],
                "stages": [{"at": 2 ** 39, "share_bp": 10000}] * len(stages), "window": out["window"]}
    rolloutdoc.check(stand_in)
    if not _fits(stand_in):
        raise MpotaError(f"the rollout document would not fit in the {rolloutdoc.MAX_BYTES} bytes a device reads",
                         hint="name fewer devices in --targets (use groups)")
    return out


_SIZER = None


def _fits(body: dict) -> bool:
    """Whether the signed envelope of body fits a device's buffer (signed with a stand-in key:
    every Ed25519 signature and key id has the same size)."""
    global _SIZER
    if _SIZER is None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        _SIZER = Ed25519PrivateKey.from_private_bytes(bytes(32))
    try:
        rolloutdoc.sign(body, _SIZER)
    except rolloutdoc.RolloutError:
        return False
    return True


# ---- one attempt, one device -------------------------------------------------------------------

# Refusals that say something about what a source served, not about what the release key signed:
# an unauthenticated peer (a broken or hostile mirror, a proxy) can cause them at will, so they
# never count against the release, or one could halt any rollout by corrupting a few downloads.
# (A payload that is really broken at the origin never confirms either: its stage does not advance.)
SOURCE_CODES = rolloutdoc.BAD + ("manifest-too-large", "bad-envelope", "bad-payload-type", "unknown-key",
                                 "bad-signature", "truncated", "too-long", "hash-mismatch")


def classify(a: dict, device: dict | None, now: float, silent_after_s: float) -> tuple[str, str | None]:
    """(confirmed | failed | pending, why) of one attempt row (inventory.ATTEMPT_FIELDS) at `now`."""
    out = a["outcome"]
    if out == "confirmed":
        return "confirmed", None
    if out == "rolled-back":
        return "failed", f"rolled back ({a.get('code') or 'no code'})"
    if out == "refused":
        code = a.get("code")
        if code in rolloutdoc.HELD or code in SOURCE_CODES:  # held back by the rollout, or what a
            return "pending", None                           # source served: no verdict on the release
        return "failed", f"refused ({code or 'no code'})"
    if out == "installed":
        dev = device or {}
        if dev.get("version") == a["release"] and dev.get("pending") != a["release"]:
            return "confirmed", None  # runs the release and checks again: its confirmation was lost
        heard = max(x for x in (dev.get("last_seen"), a.get("installed_at"), a.get("last_at"), 0) if x is not None)
        if now - heard > silent_after_s:
            return "failed", f"installed, then silent for {now - heard:.0f} s (> {silent_after_s:g} s)"
    return "pending", None


def stage_of(b: int, stages_bp: list[int]) -> int | None:
    """The first stage whose share holds bucket b (None: beyond the last stage)."""
    for k, bp in enumerate(stages_bp):
        if rolloutdoc.in_share(b, bp):
            return k
    return None


def is_targeted(targets: dict | None, device: dict) -> bool:
    """rolloutdoc.targeted over what the fleet knows of a device: its board, and its cohort as
    its one group (the device's own `groups` setting lives in its config, not on the server)."""
    return rolloutdoc.targeted({"targets": targets}, device["id"], device.get("board") or "",
                               [device["cohort"]] if device.get("cohort") else [])


def _rate(failed: int, confirmed: int) -> float | None:
    return failed / (failed + confirmed) if failed + confirmed else None


def alpha_at(n: int, alpha: float = ALPHA) -> float:
    """The level of the halting test on n ended attempts: alpha / (n (n + 1)). These sum to
    alpha over n = 1, 2, ... (an alpha-spending sequence), so however often the server looks,
    and whatever it saw before, the chance that a release failing at exactly the limit is ever
    halted is at most alpha (a union bound over the n it looked at); below the limit, less."""
    return alpha / (n * (n + 1)) if n else 0.0


def halt_test(failed: int, confirmed: int, max_rate: float, alpha: float = ALPHA) -> dict:
    """One-sided exact binomial test of "the failure rate is above max_rate" on failed of
    failed + confirmed attempts, at the level alpha_at(n): {"p_value", "level", "halt", "reason"}."""
    n = failed + confirmed
    if n == 0 or failed == 0:
        p = 1.0
    else:
        from scipy import stats  # half a second to import: only when there is something to test
        p = float(stats.binomtest(failed, n, max_rate, alternative="greater").pvalue)
    level = alpha_at(n, alpha)
    halt = p < level
    reason = (f"{failed} of {n} attempts failed ({failed / n:.1%}): one-sided exact binomial test of a failure "
              f"rate above {max_rate:.1%} gives p = {p:.2g}, {'below' if halt else 'not below'} "
              f"{alpha}/(n(n+1)) = {level:.2g}"
              if n else "no attempt has ended yet")
    return {"failed": failed, "attempts": n, "p_value": p, "alpha": alpha, "level": level, "halt": halt,
            "reason": reason}


# ---- the whole rollout ---------------------------------------------------------------------

def evaluate(rollout: dict, devices: list[dict], attempts: list[dict], now: float, *,
             regressions: list[dict] = ()) -> dict:
    """rollout: {"release" (digest), "version", "config" (check_config), "stage" (index),
    "state" (STATES), "reason"}; devices: rows with id, board, cohort, registered (bool),
    version, pending, last_seen; attempts: the attempt rows at the release (keyed by version);
    regressions: monitor.regressions() over the fleet's attempts.

    Returns {"stages": [per stage: share_bp, devices, attempts, confirmed, failed, pending, rate,
    reached], "totals", "test", "regression", "exclude", "decision": {"action": advance | hold |
    halt | complete | none, "reason", "stage"}}."""
    cfg = rollout["config"]
    stages_bp, release = cfg["stages_bp"], rollout["release"]
    by_id = {d["id"]: d for d in devices}
    rows = [{"share_bp": bp, "devices": 0, "attempts": 0, "confirmed": 0, "failed": 0, "pending": 0,
             "rate": None, "reached": k <= rollout["stage"], "_targeted_confirmed": 0}
            for k, bp in enumerate(stages_bp)]
    stage_cache: dict = {}

    def stage(dev_id):
        if dev_id not in stage_cache:
            stage_cache[dev_id] = stage_of(rolloutdoc.bucket(dev_id, release), stages_bp)
        return stage_cache[dev_id]

    targeted = set()
    for d in devices:
        if d.get("registered", True) and is_targeted(cfg.get("targets"), d):
            k = stage(d["id"])
            if k is not None:
                rows[k]["devices"] += 1
                targeted.add(d["id"])
    failures = []
    for a in attempts:
        k = stage(a["device"])
        if k is None:
            continue
        verdict, why = classify(a, by_id.get(a["device"]), now, cfg["silent_after_s"])
        r = rows[k]
        r["attempts"] += 1
        r[verdict] += 1
        if verdict == "confirmed" and a["device"] in targeted:
            r["_targeted_confirmed"] += 1
        if verdict == "failed":
            failures.append((a.get("ended_at") or a.get("installed_at") or a.get("last_at") or 0, a["device"], why))
    for r in rows:
        r["rate"] = _rate(r["failed"], r["confirmed"])
    failed = sum(r["failed"] for r in rows)
    confirmed = sum(r["confirmed"] for r in rows)
    test = halt_test(failed, confirmed, cfg["max_failure_rate"])
    regression = next((t for t in regressions if t.get("release") == rollout["version"] and t.get("alarm")), None)
    failures.sort()
    out = {"stages": rows, "test": test, "regression": regression,
           "totals": {"devices": sum(r["devices"] for r in rows), "attempts": sum(r["attempts"] for r in rows),
                      "confirmed": confirmed, "failed": failed, "pending": sum(r["pending"] for r in rows),
                      "rate": _rate(failed, confirmed)},
           "failures": [{"device": d, "why": w, "at": t} for t, d, w in failures],
           "exclude": [d for _, d, _ in failures][:MAX_EXCLUDE]}
    out["decision"] = _decide(rollout, rows, test, regression)
    for r in rows:  # confirmations that advance the stage
        r["need"] = min(cfg["min_devices"], r["devices"])
        del r["_targeted_confirmed"]
    return out


def _decide(rollout: dict, rows: list[dict], test: dict, regression: dict | None) -> dict:
    cfg, k, state = rollout["config"], rollout["stage"], rollout["state"]
    if state == "halted":
        return {"action": "none", "stage": k, "reason": f"halted: {rollout.get('reason') or 'no reason given'}"}
    if state == "complete":
        return {"action": "none", "stage": k, "reason": "complete: every stage advanced"}
    if test["halt"]:
        return {"action": "halt", "stage": k, "reason": test["reason"]}
    if regression is not None:
        return {"action": "halt", "stage": k, "reason": "regression: " + regression["reason"]}
    if state == "paused":
        return {"action": "hold", "stage": k, "reason": f"paused: {rollout.get('reason') or 'by hand'}"}
    r, n, limit = rows[k], cfg["min_devices"], cfg["max_failure_rate"]
    name = f"stage {k + 1} ({pct(r['share_bp'])})"
    rate = r["rate"] or 0.0
    if r["devices"] >= n:
        enough = r["confirmed"] >= n
        need = f"{r['confirmed']} of the {n} confirmations needed"
    else:
        enough = r["_targeted_confirmed"] >= r["devices"]
        need = f"{r['_targeted_confirmed']} of its {r['devices']} device{'s' * (r['devices'] != 1)} confirmed " \
               f"(fewer than {n} exist)"
    if rate >= limit:
        return {"action": "hold", "stage": k, "reason": f"{name}: failure rate {rate:.1%} ({r['failed']} of "
                                                        f"{r['failed'] + r['confirmed']}) is not below {limit:.1%}; {need}"}
    if not enough:
        return {"action": "hold", "stage": k, "reason": f"{name}: {need}; failure rate {rate:.1%}"}
    last = k == len(rows) - 1
    why = f"{name}: {need}, failure rate {rate:.1%} < {limit:.1%}"
    if last:
        return {"action": "complete", "stage": k, "reason": why}
    return {"action": "advance", "stage": k + 1, "reason": why + f"; now stage {k + 2} ({pct(rows[k + 1]['share_bp'])})"}


def pct(bp: int) -> str:
    return f"{bp / 100:g} %"


# ---- the document of a rollout -----------------------------------------------------------------

def next_issued(last: int | None, now: float) -> int:
    """Strictly increasing: the time, or one more than the last document's if that is later."""
    return max(int(now), (last or 0) + 1)


def document(rollout: dict, issued: int, exclude: list[str]) -> dict:
    """The body of rollout.json for the rollout's present state (rolloutdoc.build checks it).
    rollout["stage_at"] holds the time each stage reached began."""
    cfg = rollout["config"]
    halted = (rollout.get("reason") or "halted") if rollout["state"] == "halted" else None
    if halted is not None:
        stages = [{"at": issued, "share_bp": 0}]
    else:
        stages = [{"at": int(t), "share_bp": bp} for t, bp in zip(rollout["stage_at"], cfg["stages_bp"])]
    body = rolloutdoc.build(rollout["release"], rollout["version"], rollout["id"], issued,
                            issued + cfg["valid_for_s"] if halted is None
                            else min(issued + cfg["valid_for_s"], rolloutdoc.ISSUED_MAX), stages, halted=halted and halted[:160],
                            targets=cfg.get("targets"), exclude=exclude, window=cfg.get("window"))
    # a penalty box of 64 long ids may not fit beside long targets: keep the devices that failed
    # first (a halt must always be signable)
    n = len(body["exclude"])
    while n and not _fits(body):
        n -= 1
        body["exclude"] = body["exclude"][:n]
    return body


def content(body: dict | None) -> tuple | None:
    """What a document says apart from its times: when this changes it is signed again."""
    if body is None:
        return None
    return (body["halted"], tuple(s["share_bp"] for s in body["stages"]), tuple(body["exclude"]))


def resign_reason(signed: dict | None, wanted: tuple, now: float) -> str | None:
    """Why the document must be signed again now (None: it stands). signed: the body signed
    last; wanted: content() of the document the rollout's state calls for."""
    if signed is None:
        return "first document"
    have = content(signed)
    if have[0] != wanted[0]:
        return "halted" if wanted[0] is not None else "state"
    if have[1] != wanted[1]:
        return "stage"
    if have[2] != wanted[2]:
        return "exclude"
    if now >= signed["issued"] + (signed["expires"] - signed["issued"]) / 2:
        return "refresh"
    return None
