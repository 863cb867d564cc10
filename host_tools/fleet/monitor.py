"""Statistics and anomalies: plain functions of attempt rows, device rows and activity counts,
each returning what it found and why, in words a person can check on the dashboard. No I/O.

- release_stats: per release, board and cohort: install, confirm, rollback, refusal, failure
  and failed-silent counts and rates; median and 90th-percentile times to install and confirm.
- regressions: "this release fails more often than the previous one" on the same board, by a
  one-sided Fisher exact test, Holm-corrected across every comparison made at once, so that the
  chance of any false alarm in one evaluation is at most ALPHA (docs/fleet.md).
- boot_loops: repeated rollbacks or resets of one device within a window.
- outliers: devices whose free heap, crash resets or time to confirm stand out from their peers
  on the same release and board (median and MAD: the modified z-score of Iglewicz and Hoaglin).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

from . import inventory

ALPHA = 0.01            # family-wise false-alarm rate of one evaluation of all regression tests
Z_LIMIT = 3.5           # |modified z| above this is an outlier (Iglewicz & Hoaglin 1993)
MIN_PEERS = 5           # fewer devices on a release and board: no outlier judgement
LOOP_WINDOW_S = 3600.0  # boot loops are counted over the last hour
LOOP_BOOTS = 5          # boots in the window (the agent's boot counter) that make a loop
LOOP_ROLLBACKS = 2      # rollbacks in the window that make a loop
LOOP_CRASHES = 3        # boots after a watchdog or hard reset (panic, brown-out) in the window
CRASH_RESETS = (2, 3)   # machine.reset_cause(): HARD_RESET (panic, brown-out), WDT_RESET

FAILED = ("rolled-back", "failed-silent")   # the release's image did not survive on the device


def _scipy_stats():
    from scipy import stats  # half a second to import: only when a statistic is computed
    return stats


def version_key(v: str | None):
    """Order versions as people do: 1.10.0 after 1.9.0; text parts compare as text."""
    parts = re.findall(r"\d+|[^\d.+-]+", v or "")
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    i = (len(xs) - 1) * q
    lo, hi = math.floor(i), math.ceil(i)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def _rate(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def outcomes(attempts: list[dict], devices: dict, now: float) -> list[dict]:
    """Each attempt with its outcome at `now` (failed-silent needs the device's last sighting)."""
    return [{**a, "outcome": inventory.attempt_outcome(a, devices.get(a["device"]), now)} for a in attempts]


def _summary(rows: list[dict]) -> dict:
    n = len(rows)
    count = defaultdict(int)
    for a in rows:
        count[a["outcome"]] += 1
    installed = sum(1 for a in rows if a["installed_at"] is not None)
    inst_t = [a["installed_at"] - a["started_at"] for a in rows if a["installed_at"] is not None
              and a["started_at"] is not None and a["installed_at"] >= a["started_at"]]
    conf_t = [a["confirmed_at"] - a["installed_at"] for a in rows if a["confirmed_at"] is not None
              and a["installed_at"] is not None]
    failed = count["rolled-back"] + count["failed-silent"]
    return {
        "devices": n, "installed": installed, "confirmed": count["confirmed"], "rolled_back": count["rolled-back"],
        "failed_silent": count["failed-silent"], "pending": count["installed"], "refused": count["refused"],
        "failed": count["failed"], "downloading": count["started"],
        "install_rate": _rate(installed, n), "confirm_rate": _rate(count["confirmed"], installed),
        "rollback_rate": _rate(count["rolled-back"], installed), "silent_rate": _rate(count["failed-silent"], installed),
        "refusal_rate": _rate(count["refused"], n), "failure_rate": _rate(failed, failed + count["confirmed"]),
        "install_s": {"median": _quantile(inst_t, 0.5), "p90": _quantile(inst_t, 0.9)},
        "confirm_s": {"median": _quantile(conf_t, 0.5), "p90": _quantile(conf_t, 0.9)},
        "codes": dict(sorted(_codes(rows).items(), key=lambda kv: -kv[1])[:8]),
    }


def _codes(rows):
    c = defaultdict(int)
    for a in rows:
        if a["outcome"] in ("rolled-back", "refused", "failed") and a.get("code"):
            c[a["code"]] += 1
    return c


def release_stats(rows: list[dict]) -> list[dict]:
    """rows: outcomes(). One entry per release (newest first) with its totals and one line per
    board and cohort."""
    by_rel = defaultdict(list)
    for a in rows:
        by_rel[a["release"]].append(a)
    out = []
    for rel in sorted(by_rel, key=version_key, reverse=True):
        groups = defaultdict(list)
        for a in by_rel[rel]:
            groups[(a["board"] or "?", a["cohort"] or inventory.DEFAULT_COHORT)].append(a)
        out.append({"release": rel, **_summary(by_rel[rel]),
                    "groups": [{"board": b, "cohort": c, **_summary(g)} for (b, c), g in sorted(groups.items())]})
    return out


def _holm(pvalues: list[float], alpha: float) -> list[bool]:
    """Holm's step-down: reject the smallest p-values while p_(i) <= alpha / (m - i)."""
    m = len(pvalues)
    reject = [False] * m
    for rank, i in enumerate(sorted(range(m), key=lambda j: pvalues[j])):
        if pvalues[i] > alpha / (m - rank):
            break
        reject[i] = True
    return reject


def regressions(rows: list[dict], alpha: float = ALPHA) -> list[dict]:
    """For each board, each release against the previous release (by version) that devices of
    that board installed: failures (rolled back or failed-silent) against confirmations. A
    one-sided Fisher exact test asks whether the newer one fails more often; Holm's correction
    over all the comparisons keeps the chance of any false alarm at most alpha."""
    tally = defaultdict(lambda: [0, 0])  # (board, release) -> [failed, confirmed]
    for a in rows:
        if a["outcome"] in FAILED:
            tally[(a["board"] or "?", a["release"])][0] += 1
        elif a["outcome"] == "confirmed":
            tally[(a["board"] or "?", a["release"])][1] += 1
    by_board = defaultdict(list)
    for board, rel in tally:
        by_board[board].append(rel)
    tests = []
    for board, rels in sorted(by_board.items()):
        rels.sort(key=version_key)
        for prev, rel in zip(rels, rels[1:]):
            (f1, c1), (f0, c0) = tally[(board, rel)], tally[(board, prev)]
            if f1 + c1 == 0 or f0 + c0 == 0:
                continue
            p = float(_scipy_stats().fisher_exact([[f1, c1], [f0, c0]], alternative="greater").pvalue)
            tests.append({"board": board, "release": rel, "previous": prev, "failed": f1, "confirmed": c1,
                          "previous_failed": f0, "previous_confirmed": c0, "p_value": p,
                          "rate": f1 / (f1 + c1), "previous_rate": f0 / (f0 + c0)})
    for t, alarm in zip(tests, _holm([t["p_value"] for t in tests], alpha)):
        t["alarm"] = alarm
        t["tests"], t["alpha"] = len(tests), alpha
        t["reason"] = (f"{t['release']} on {t['board']}: {t['failed']} of {t['failed'] + t['confirmed']} failed "
                       f"({t['rate']:.0%}) against {t['previous_failed']} of "
                       f"{t['previous_failed'] + t['previous_confirmed']} ({t['previous_rate']:.0%}) for "
                       f"{t['previous']}; one-sided Fisher p = {t['p_value']:.2g}, "
                       f"{'below' if alarm else 'not below'} the Holm threshold for alpha {alpha} over "
                       f"{len(tests)} comparison(s)")
    return tests


def boot_loops(activity: list[dict]) -> list[dict]:
    """activity: per device over the last LOOP_WINDOW_S (storage.activity). A device is in a boot
    loop when its boot counter rose by LOOP_BOOTS, or it rolled back LOOP_ROLLBACKS times, or
    booted LOOP_CRASHES times after a watchdog or hard reset, within the window."""
    out = []
    for r in activity:
        boots = (r["boots_max"] - r["boots_min"]) if r["boots_max"] is not None and r["boots_min"] is not None else 0
        why = []
        if boots >= LOOP_BOOTS:
            why.append(f"{boots} boots")
        if (r["rollbacks"] or 0) >= LOOP_ROLLBACKS:
            why.append(f"{r['rollbacks']} rollbacks")
        if (r["crash_resets"] or 0) >= LOOP_CRASHES:
            why.append(f"{r['crash_resets']} boots after a watchdog or hard reset")
        if why:
            out.append({"kind": "boot-loop", "device": r["device"], "version": r.get("version"),
                        "reason": f"{', '.join(why)} in the last {LOOP_WINDOW_S / 3600:g} h"})
    return out


def robust_z(values: list[float]) -> list[float | None]:
    """Modified z-scores 0.6745 (x - median) / MAD; when the MAD is 0 (most peers equal), the
    mean absolute deviation times 1.2533 stands in (IBM SPSS's rule); None if every value is equal."""
    if not values:
        return []
    med = float(_quantile(values, 0.5))
    mad = float(_scipy_stats().median_abs_deviation(values))
    if mad > 0:
        return [0.6745 * (x - med) / mad for x in values]
    mean_ad = sum(abs(x - med) for x in values) / len(values)
    if mean_ad == 0:
        return [None] * len(values)
    return [(x - med) / (1.2533 * mean_ad) for x in values]


# metric: (what it is, unit, which side is bad, smallest value worth naming)
METRICS = {
    "heap": ("free heap", "bytes", -1, None),
    "crash_resets": ("boots after a watchdog or hard reset (last hour)", "", +1, 2),
    "confirm_s": ("time from install to confirmation", "s", +1, None),
}


def outliers(devices: list[dict], rows: list[dict], activity: list[dict]) -> list[dict]:
    """Devices whose metric stands out (|modified z| > Z_LIMIT on the bad side) among the devices
    running the same release on the same board (at least MIN_PEERS of them)."""
    samples = defaultdict(list)  # (metric, version, board) -> [(device, value)]
    for d in devices:
        if d.get("version") and d.get("heap") is not None:
            samples[("heap", d["version"], d.get("board") or "?")].append((d["id"], float(d["heap"])))
    board_of = {d["id"]: (d.get("version"), d.get("board") or "?") for d in devices}
    for r in activity:
        v, b = board_of.get(r["device"], (None, None))
        if v:
            samples[("crash_resets", v, b)].append((r["device"], float(r["crash_resets"] or 0)))
    for a in rows:
        if a["confirmed_at"] is not None and a["installed_at"] is not None:
            samples[("confirm_s", a["release"], a["board"] or "?")].append(
                (a["device"], a["confirmed_at"] - a["installed_at"]))
    out = []
    for (metric, version, board), pts in sorted(samples.items()):
        if len(pts) < MIN_PEERS:
            continue
        what, unit, side, floor = METRICS[metric]
        values = [v for _, v in pts]
        med = _quantile(values, 0.5)
        for (dev, x), z in zip(pts, robust_z(values)):
            if z is None or z * side <= Z_LIMIT or (floor is not None and x < floor):
                continue
            out.append({"kind": "outlier", "metric": metric, "device": dev, "version": version, "board": board,
                        "value": x, "median": med, "z": round(z, 2), "peers": len(pts),
                        "reason": f"{what} {x:g}{unit and ' ' + unit} against a median of {med:g} over "
                                  f"{len(pts)} devices on {version}/{board} (modified z {z:+.1f})"})
    return out


def progress(rows: list[dict], devices: dict, now: float, points: int = 48) -> dict:
    """A release's progress over time: cumulative installed, confirmed, rolled back and
    failed-silent at `points` times from its first attempt to now (for the chart)."""
    if not rows:
        return {"t": [], "series": {}}
    t0 = min(a["started_at"] for a in rows)
    t1 = max(now, t0 + 1)
    ts = [t0 + (t1 - t0) * i / (points - 1) for i in range(points)]
    marks = {"installed": [], "confirmed": [], "rolled_back": [], "failed_silent": []}
    for a in rows:
        if a["installed_at"] is not None:
            marks["installed"].append(a["installed_at"])
        if a["outcome"] == "confirmed" and a["confirmed_at"] is not None:
            marks["confirmed"].append(a["confirmed_at"])
        if a["outcome"] == "rolled-back" and a["rolled_back_at"] is not None:
            marks["rolled_back"].append(a["rolled_back_at"])
        if a["outcome"] == "failed-silent":
            d = devices.get(a["device"]) or {}
            marks["failed_silent"].append(d.get("silent_at") or now)
    series = {k: [sum(1 for m in v if m <= t) for t in ts] for k, v in marks.items()}
    return {"t": ts, "series": series}


def fleet_matrix(devices: list[dict]) -> dict:
    """Devices by running version (newest first) and board."""
    boards = sorted({d.get("board") or "?" for d in devices})
    counts = defaultdict(int)
    for d in devices:
        counts[(d.get("version") or "(unknown)", d.get("board") or "?")] += 1
    versions = sorted({v for v, _ in counts}, key=version_key, reverse=True)
    return {"boards": boards, "rows": [{"version": v, "counts": [counts[(v, b)] for b in boards],
                                        "total": sum(counts[(v, b)] for b in boards)} for v in versions]}
