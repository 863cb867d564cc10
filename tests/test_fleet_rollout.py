"""Rollouts that advance and halt themselves (docs/rollout.md "Fleet server").

- The policy (mpota.fleet.rollout) as plain functions: advance after N confirmations, no advance
  while the stage's failure rate is at or above R, halt on conclusive evidence (and only then),
  silence after an install counts after T, held codes never count, the penalty box, empty
  stages, the document each state calls for, and the halting rule's false-alarm rate.
- Storage of rollouts and their history on SQLite and PostgreSQL, and acting on it (rollouts.py):
  start, tick, pause, resume, halt, issued strictly increasing, one evaluator among processes.
- End to end: a real `mpota fleet serve --rollout-key` and CPython Reporters standing in for
  devices (each deciding with rolloutdoc.open_document + decide): a healthy release goes from
  1 % to 100 % by itself; an unhealthy one halts in its first stage.
"""
from __future__ import annotations

import hashlib

import pytest

from mpota import keys, rolloutdoc
from mpota.fleet import inventory, rollout

RELEASE = hashlib.sha256(b"a release").hexdigest()
VERSION = "2.0.0"
NOW = 1_800_000_000.0


def config(**kw):
    base = {"stages_bp": [100, 1000, 5000, 10000], "min_devices": 5, "max_failure_rate": 0.1, "silent_after_s": 3600}
    base.update(kw)
    return rollout.check_config(base)


def state(cfg=None, stage=0, st="running", reason=None):
    return {"id": "r-1", "release": RELEASE, "version": VERSION, "config": cfg or config(), "stage": stage,
            "state": st, "reason": reason, "stage_at": [int(NOW) - 1000 + i for i in range(stage + 1)]}


def ids_by_stage(stages_bp, n_devices=2000, release=RELEASE):
    """Device ids dev-0000.. grouped by the stage their bucket puts them in."""
    out = {k: [] for k in range(len(stages_bp))}
    for i in range(n_devices):
        d = f"dev-{i:04d}"
        k = rollout.stage_of(rolloutdoc.bucket(d, release), stages_bp)
        if k is not None:
            out[k].append(d)
    return out


def device(d, **kw):
    row = {"id": d, "board": "esp32", "cohort": "default", "registered": True, "version": "1.0.0", "pending": None,
           "last_seen": NOW - 10}
    row.update(kw)
    return row


def attempt(d, outcome, code=None, at=NOW - 100):
    a = dict.fromkeys(inventory.ATTEMPT_FIELDS)
    a.update(device=d, release=VERSION, board="esp32", cohort="default", started_at=at - 60, outcome=outcome, code=code,
             last_at=at, installed_at=at if outcome in ("installed", "confirmed", "rolled-back") else None,
             ended_at=at if outcome != "installed" else None)
    return a


STAGES = ids_by_stage([100, 1000, 5000, 10000])
ALL = [d for k in sorted(STAGES) for d in STAGES[k]]


def fleet(**overrides):
    return [device(d, **overrides.get(d, {})) for d in ALL]


# ---- policy ------------------------------------------------------------------------------------

def test_stages_partition_the_fleet_by_bucket():
    assert len(ALL) == 2000 and all(STAGES.values())
    assert 5 <= len(STAGES[0]) <= 40 and 100 <= len(STAGES[1]) <= 260
    ev = rollout.evaluate(state(), fleet(), [], NOW)
    assert [s["devices"] for s in ev["stages"]] == [len(STAGES[k]) for k in range(4)]
    assert ev["decision"]["action"] == "hold" and "0 of the 5 confirmations needed" in ev["decision"]["reason"]


def test_advance_after_n_confirmed_and_complete_at_the_last_stage():
    first = STAGES[0]
    ev = rollout.evaluate(state(), fleet(), [attempt(d, "confirmed") for d in first[:4]], NOW)
    assert ev["decision"]["action"] == "hold" and ev["stages"][0]["confirmed"] == 4
    ev = rollout.evaluate(state(), fleet(), [attempt(d, "confirmed") for d in first[:5]], NOW)
    assert ev["decision"] == {"action": "advance", "stage": 1, "reason": ev["decision"]["reason"]}
    assert "5 of the 5 confirmations needed" in ev["decision"]["reason"]
    # confirmations from later stages do not advance an earlier one
    ev = rollout.evaluate(state(), fleet(), [attempt(d, "confirmed") for d in STAGES[1][:50]], NOW)
    assert ev["decision"]["action"] == "hold" and ev["stages"][1]["confirmed"] == 50
    ev = rollout.evaluate(state(stage=3), fleet(), [attempt(d, "confirmed") for d in STAGES[3][:5]], NOW)
    assert ev["decision"]["action"] == "complete"


def test_no_advance_while_the_stage_fails_at_or_above_r():
    first = STAGES[1]
    atts = [attempt(d, "confirmed") for d in first[:9]] + [attempt(first[9], "rolled-back", "health-failed")]
    ev = rollout.evaluate(state(stage=1), fleet(), atts, NOW)  # 1 of 10 = 10 %: not below R
    assert ev["decision"]["action"] == "hold", ev["decision"]
    assert "failure rate 10.0% (1 of 10) is not below 10.0%" in ev["decision"]["reason"]
    atts.append(attempt(first[10], "confirmed"))  # 1 of 11 = 9.1 %
    assert rollout.evaluate(state(stage=1), fleet(), atts, NOW)["decision"]["action"] == "advance"


def test_halt_on_conclusive_evidence_only():
    stage = STAGES[1]
    # 2 of 10 failed with R = 10 %: P(X >= 2 | 10, 0.1) = 0.26, no evidence of a rate above R
    atts = [attempt(d, "confirmed") for d in stage[:8]] + [attempt(d, "rolled-back") for d in stage[8:10]]
    ev = rollout.evaluate(state(stage=1), fleet(), atts, NOW)
    assert ev["decision"]["action"] == "hold" and not ev["test"]["halt"] and 0.2 < ev["test"]["p_value"] < 0.3
    # 6 of 15: P(X >= 6 | 15, 0.1) = 0.0022 < 0.01
    atts = [attempt(d, "confirmed") for d in stage[:9]] + [attempt(d, "rolled-back") for d in stage[9:15]]
    ev = rollout.evaluate(state(stage=1), fleet(), atts, NOW)
    assert ev["decision"]["action"] == "halt", ev["decision"]
    assert "6 of 15 attempts failed" in ev["decision"]["reason"] and "binomial" in ev["decision"]["reason"]
    assert ev["test"]["p_value"] == pytest.approx(0.00225, rel=0.05)
    # a paused rollout still halts on conclusive evidence
    assert rollout.evaluate(state(stage=1, st="paused"), fleet(), atts, NOW)["decision"]["action"] == "halt"
    # the evidence of every stage counts: failures in stage 1 and 2 together
    atts = [attempt(d, "rolled-back") for d in STAGES[0][:3]] + [attempt(d, "rolled-back") for d in stage[:3]]
    ev = rollout.evaluate(state(stage=1), fleet(), atts + [attempt(d, "confirmed") for d in stage[3:12]], NOW)
    assert ev["totals"]["failed"] == 6 and ev["decision"]["action"] == "halt"


def test_the_binomial_test_is_scipys():
    from scipy import stats
    for k, n, r in ((3, 10, 0.05), (1, 40, 0.02), (12, 100, 0.05)):
        assert rollout.halt_test(k, n - k, r)["p_value"] == stats.binomtest(k, n, r, alternative="greater").pvalue


def test_a_regression_flagged_by_the_monitor_halts():
    reg = [{"release": VERSION, "alarm": True, "reason": "2.0.0 on esp32: 4 of 9 failed against 0 of 30"},
           {"release": "1.0.0", "alarm": True, "reason": "other"}]
    ev = rollout.evaluate(state(), fleet(), [], NOW, regressions=reg)
    assert ev["decision"]["action"] == "halt" and ev["decision"]["reason"].startswith("regression: 2.0.0 on esp32")
    reg[0]["alarm"] = False
    assert rollout.evaluate(state(), fleet(), [], NOW, regressions=reg)["decision"]["action"] == "hold"


def test_installed_then_silent_longer_than_t_is_a_failure():
    d = STAGES[0][0]
    a = attempt(d, "installed", at=NOW - 3000)
    quiet = fleet(**{d: {"last_seen": NOW - 3000, "pending": VERSION}})
    ev = rollout.evaluate(state(), quiet, [a], NOW)
    assert ev["stages"][0]["pending"] == 1 and ev["stages"][0]["failed"] == 0
    ev = rollout.evaluate(state(), quiet, [a], NOW + 601)  # 3601 s > T = 3600 s
    assert ev["stages"][0]["failed"] == 1 and ev["exclude"] == [d]
    assert "silent for 3601 s" in ev["failures"][0]["why"]
    # heard from since (a check with the new version: its confirmation was lost): confirmed
    back = fleet(**{d: {"last_seen": NOW, "version": VERSION, "pending": None}})
    assert rollout.evaluate(state(), back, [a], NOW + 601)["stages"][0]["confirmed"] == 1


def test_held_codes_and_transport_failures_do_not_count():
    first = STAGES[0]
    atts = [attempt(first[0], "refused", "rollout-halted"), attempt(first[1], "refused", "not-in-rollout"),
            attempt(first[2], "failed", "network"), attempt(first[3], "started"),
            attempt(first[4], "refused", "bad-signature"), attempt(first[5], "refused", "rollout-bad-signature")]
    ev = rollout.evaluate(state(), fleet(), atts, NOW)
    s = ev["stages"][0]
    assert (s["failed"], s["pending"], s["confirmed"]) == (2, 4, 0)
    assert ev["exclude"] == sorted([first[4], first[5]], key=lambda d: first.index(d))
    for code in rolloutdoc.HELD:
        assert rollout.classify(attempt("x", "refused", code), None, NOW, 60) == ("pending", None)


def test_penalty_box_lists_failed_devices_in_order_up_to_64():
    stage = STAGES[2]
    atts = [attempt(d, "rolled-back", at=NOW - 1000 + i) for i, d in enumerate(stage[:70])]
    ev = rollout.evaluate(state(stage=2), fleet(), atts, NOW)
    assert ev["exclude"] == stage[:64] and len(ev["failures"]) == 70
    body = rollout.document({**state(stage=2), "reason": None}, int(NOW), ev["exclude"])
    assert body["exclude"] == stage[:64]
    assert len(rolloutdoc.sign(body, keys.Ed25519PrivateKey.generate())) <= rolloutdoc.MAX_BYTES


def test_an_empty_stage_advances_and_a_small_one_needs_all_its_devices():
    cfg = config(min_devices=5)
    few = [device(d) for d in STAGES[0][:3]]  # a fleet with 3 devices in stage 1 and none later
    ev = rollout.evaluate(state(cfg, stage=1), few, [], NOW)
    assert ev["stages"][1]["devices"] == 0 and ev["decision"]["action"] == "advance"
    ev = rollout.evaluate(state(cfg), few, [attempt(d, "confirmed") for d in STAGES[0][:2]], NOW)
    assert ev["decision"]["action"] == "hold" and "2 of its 3 devices confirmed" in ev["decision"]["reason"]
    ev = rollout.evaluate(state(cfg), few, [attempt(d, "confirmed") for d in STAGES[0][:3]], NOW)
    assert ev["decision"]["action"] == "advance"
    # unregistered or untargeted devices are not waited for
    cfg_t = config(min_devices=5, targets={"boards": ["esp32s3"]})
    ev = rollout.evaluate(state(cfg_t), few, [], NOW)
    assert ev["stages"][0]["devices"] == 0 and ev["decision"]["action"] == "advance"
    cfg_g = config(min_devices=5, targets={"groups": ["canary"]})
    mixed = [device(STAGES[0][0], cohort="canary")] + [device(d) for d in STAGES[0][1:3]]
    ev = rollout.evaluate(state(cfg_g), mixed, [attempt(STAGES[0][0], "confirmed")], NOW)
    assert ev["stages"][0]["devices"] == 1 and ev["decision"]["action"] == "advance"


def test_halted_paused_and_complete_rollouts():
    atts = [attempt(d, "confirmed") for d in STAGES[0][:5]]
    assert rollout.evaluate(state(st="paused", reason="looking"), fleet(), atts, NOW)["decision"] == {
        "action": "hold", "stage": 0, "reason": "paused: looking"}
    assert rollout.evaluate(state(st="halted", reason="bad"), fleet(), atts, NOW)["decision"]["action"] == "none"
    assert rollout.evaluate(state(stage=3, st="complete"), fleet(), atts, NOW)["decision"]["action"] == "none"


def test_documents_for_each_state():
    st = state(stage=1)
    body = rollout.document(st, int(NOW), ["dev-1"])
    assert body["stages"] == [{"at": int(NOW) - 1000, "share_bp": 100}, {"at": int(NOW) - 999, "share_bp": 1000}]
    assert body["halted"] is None and body["expires"] == int(NOW) + rollout.DEFAULT_VALID_FOR_S
    assert rolloutdoc.share_at(body["stages"], int(NOW)) == 1000
    halted = rollout.document({**st, "state": "halted", "reason": "x" * 300}, int(NOW), [])
    assert halted["halted"] == "x" * 160 and rolloutdoc.share_at(halted["stages"], int(NOW)) == 0
    assert rollout.next_issued(None, NOW) == int(NOW) and rollout.next_issued(int(NOW) + 5, NOW) == int(NOW) + 6
    c = rollout.content(body)
    assert rollout.resign_reason(None, c, NOW) == "first document"
    assert rollout.resign_reason(body, c, NOW) is None
    assert rollout.resign_reason(body, c, NOW + 43200) == "refresh"  # half of a day
    assert rollout.resign_reason(body, rollout.content(halted), NOW) == "halted"
    assert rollout.resign_reason(body, rollout.content(rollout.document(state(stage=2), 1, ["dev-1"])), NOW) == "stage"
    assert rollout.resign_reason(body, rollout.content(rollout.document(st, 1, ["dev-1", "dev-2"])), NOW) == "exclude"


def test_config_is_checked_with_hints():
    from mpota import MpotaError
    for bad in ({"stages_bp": [1000, 100]}, {"stages_bp": []}, {"min_devices": 0}, {"max_failure_rate": 1.5},
                {"silent_after_s": 0}, {"targets": {"boards": ["no spaces"]}},
                {"window": {"cron": "0 2 * *", "duration_s": 3600}}):
        with pytest.raises(MpotaError):
            config(**bad)
