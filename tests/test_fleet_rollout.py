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
import shutil
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet_util import BASE, batch, new_secret, rep
from mpota import MpotaError, dsse, keys, rolloutdoc
from mpota.fleet import inventory, rollout, rollouts
from mpota.fleet.client import Admin, Reporter
from mpota.fleet.server import start_subprocess
from mpota.fleet.storage import Store

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
    # 6 of 15: P(X >= 6 | 15, 0.1) = 0.0022, below 0.01 but not below the level spent on 15
    # attempts, 0.01 / (15 * 16) = 4.2e-5: not yet conclusive
    atts = [attempt(d, "confirmed") for d in stage[:9]] + [attempt(d, "rolled-back") for d in stage[9:15]]
    ev = rollout.evaluate(state(stage=1), fleet(), atts, NOW)
    assert ev["decision"]["action"] == "hold" and not ev["test"]["halt"], ev["decision"]
    assert ev["test"]["p_value"] == pytest.approx(0.00225, rel=0.05)
    assert ev["test"]["level"] == pytest.approx(0.01 / 240)
    # 10 of 15: P(X >= 10 | 15, 0.1) = 1.9e-7 < 4.2e-5
    atts = [attempt(d, "confirmed") for d in stage[:5]] + [attempt(d, "rolled-back") for d in stage[5:15]]
    ev = rollout.evaluate(state(stage=1), fleet(), atts, NOW)
    assert ev["decision"]["action"] == "halt", ev["decision"]
    assert "10 of 15 attempts failed" in ev["decision"]["reason"] and "binomial" in ev["decision"]["reason"]
    # a paused rollout still halts on conclusive evidence
    assert rollout.evaluate(state(stage=1, st="paused"), fleet(), atts, NOW)["decision"]["action"] == "halt"
    # the evidence of every stage counts: 4 failures in stage 1 and 4 in stage 2, 4 confirmed:
    # P(X >= 8 | 12, 0.1) = 3.4e-6 < 0.01 / (12 * 13) = 6.4e-5
    atts = [attempt(d, "rolled-back") for d in STAGES[0][:4]] + [attempt(d, "rolled-back") for d in stage[:4]]
    ev = rollout.evaluate(state(stage=1), fleet(), atts + [attempt(d, "confirmed") for d in stage[4:8]], NOW)
    assert ev["totals"]["failed"] == 8 and ev["decision"]["action"] == "halt"


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


def test_held_codes_transport_failures_and_what_a_source_served_do_not_count():
    # A refusal of what a source served (a manifest or rollout.json that does not verify, a
    # payload that does not match its signed hash) can be caused by an unauthenticated peer: it
    # must not count against the release, or a hostile mirror could halt any rollout.
    first = STAGES[0]
    atts = [attempt(first[0], "refused", "rollout-halted"), attempt(first[1], "refused", "not-in-rollout"),
            attempt(first[2], "failed", "network"), attempt(first[3], "started"),
            attempt(first[4], "refused", "bad-signature"), attempt(first[5], "refused", "rollout-bad-signature"),
            attempt(first[6], "refused", "hash-mismatch"), attempt(first[7], "refused", "wrong-chip"),
            attempt(first[8], "rolled-back", "health-failed")]
    ev = rollout.evaluate(state(), fleet(), atts, NOW)
    s = ev["stages"][0]
    assert (s["failed"], s["pending"], s["confirmed"]) == (2, 7, 0)
    assert ev["exclude"] == [first[7], first[8]]
    for code in rolloutdoc.HELD + rollout.SOURCE_CODES:
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
    for bad in ({"stages_bp": [1000, 100]}, {"stages_bp": []}, {"min_devices": 0}, {"max_failure_rate": 1.5},
                {"silent_after_s": 0}, {"targets": {"boards": ["no spaces"]}},
                {"window": {"cron": "0 2 * *", "duration_s": 3600}}):
        with pytest.raises(MpotaError):
            config(**bad)


# ---- storage and acting on it (SQLite and PostgreSQL) -------------------------------------------

def fake_release(path, version=VERSION):
    """A release directory as far as the fleet server reads it: manifest.json (a DSSE envelope)."""
    path.mkdir(parents=True, exist_ok=True)
    env = dsse.sign(json.dumps({"schema": 1, "version": version}).encode(), [keys.Ed25519PrivateKey.generate()])
    (path / "manifest.json").write_bytes(env)
    return path, hashlib.sha256(env).hexdigest()


def story(device_id, digest, outcome, n0=1, version=VERSION):
    """The reports of one install of `version` ending in outcome, with the envelope digest."""
    out = [rep(n0, "downloading", target=version, digest=digest), rep(n0 + 1, "installed", target=version, digest=digest)]
    if outcome == "confirmed":
        out.append(rep(n0 + 2, "confirmed", version=version, slot="ota_1", digest=digest))
    elif outcome == "rolled-back":
        out.append(rep(n0 + 2, "rolled-back", target=version, code="health-failed", digest=digest))
    return out


def opened(rel_dir, key_path):
    return rolloutdoc.open_document((rel_dir / "rollout.json").read_bytes(), [keys.load_public(
        key_path.with_name(key_path.name + ".pub"))])


@pytest.fixture
def store(fleet_db):
    s = Store(fleet_db)
    yield s
    s.close()


def test_rollout_storage_ticks_and_admin_actions(store, rollout_key, tmp_path):
    key = rollouts.load_key(rollout_key)
    rel, digest = fake_release(tmp_path / "rel")
    by_stage = {k: v[:4] for k, v in ids_by_stage([500, 5000, 10000], 400, digest).items()}  # 4 per stage
    secs = {}
    for d in sorted(sum(by_stage.values(), [])):
        secs[d] = new_secret()
        store.register(d, secs[d], board="esp32", interval_s=60, now=NOW - 500)
    row = rollouts.start(store, key, rel, {"stages_bp": [500, 5000, 10000], "min_devices": 2,
                                           "max_failure_rate": 0.2, "silent_after_s": 600}, now=NOW)
    assert row["id"].startswith("r-") and row["state"] == "running" and row["release"] == digest
    doc = opened(rel, rollout_key)
    assert (doc["release"], doc["version"], doc["rollout"], doc["issued"]) == (digest, VERSION, row["id"], int(NOW))
    assert rolloutdoc.share_at(doc["stages"], int(NOW)) == 500 and doc["halted"] is None
    with pytest.raises(Exception, match="still active"):
        rollouts.start(store, key, rel, row["config"], now=NOW)
    holder = "test-a"
    assert rollouts.tick(store, key, holder=holder, now=NOW + 1) == []  # nothing reported yet: no change
    # two devices of stage 1 confirm (through the real ingest path, with the digest)
    first = by_stage[0]
    assert len(first) >= 2
    for d in first[:2]:
        store.ingest(batch(d, story(d, digest, "confirmed")), secs[d], now=NOW + 5)
    # a device that reported another digest of the same version is not this release's evidence
    other = by_stage[1][0]
    store.ingest(batch(other, story(other, "f" * 64, "rolled-back")), secs[other], now=NOW + 5)
    evs = rollouts.tick(store, key, holder=holder, now=NOW + 10)
    assert [e["action"] for e in evs] == ["advance", "sign"] and evs[1]["reason"] == "stage"
    doc2 = opened(rel, rollout_key)
    assert doc2["issued"] > doc["issued"] and rolloutdoc.share_at(doc2["stages"], doc2["issued"]) == 5000
    st = rollouts.status(store, row["id"], now=NOW + 10)
    assert st["rollout"]["stage"] == 2 and st["stages"][0]["confirmed"] == 2 and st["totals"]["failed"] == 0
    # another process does not evaluate while this one holds the lease
    assert rollouts.tick(store, key, holder="test-b", now=NOW + 11) == []
    assert store.claim("rollouts", "test-b", 30, now=NOW + 100) is True  # the lease expired
    # paused: evidence enough to advance, but the share stays
    rollouts.act(store, key, row["id"], "pause", "checking the logs", now=NOW + 101)
    for d in by_stage[1][1:3]:
        store.ingest(batch(d, story(d, digest, "confirmed")), secs[d], now=NOW + 102)
    assert rollouts.tick(store, key, holder="test-b", now=NOW + 103) == []
    assert opened(rel, rollout_key)["issued"] == doc2["issued"]
    assert store.rollout(row["id"])["state"] == "paused"
    rollouts.act(store, key, row["id"], "resume", now=NOW + 104)
    evs = rollouts.tick(store, key, holder="test-b", now=NOW + 105)
    assert [e["action"] for e in evs] == ["advance", "sign"]
    doc3 = opened(rel, rollout_key)
    assert doc3["issued"] > doc2["issued"] and rolloutdoc.share_at(doc3["stages"], doc3["issued"]) == 10000
    # halted by hand: signed at once, halted with share 0
    rollouts.act(store, key, row["id"], "halt", "boot loops on line 3", now=NOW + 106)
    doc4 = opened(rel, rollout_key)
    assert doc4["issued"] > doc3["issued"] and doc4["halted"] == "boot loops on line 3"
    assert rolloutdoc.share_at(doc4["stages"], doc4["issued"]) == 0
    with pytest.raises(Exception, match="halted"):
        rollouts.act(store, key, row["id"], "resume", now=NOW + 107)
    # a halted document is refreshed at half-life, and only then
    assert rollouts.tick(store, key, holder="test-b", now=NOW + 200) == []
    evs = rollouts.tick(store, key, holder="test-b", now=NOW + 106 + 43200)
    assert [(e["action"], e["reason"]) for e in evs] == [("sign", "refresh")]
    assert opened(rel, rollout_key)["halted"] == "boot loops on line 3"
    hist = store.rollout_history(row["id"])
    assert [h["action"] for h in reversed(hist)] == ["start", "sign", "advance", "sign", "pause", "resume", "advance",
                                                     "sign", "halt", "sign", "sign"]
    assert [r["id"] for r in store.rollouts(states=["halted"])] == [row["id"]]
    # a stale evaluation (the row moved on) changes nothing
    assert store.change_rollout(row["id"], 1, lambda cur, last: ({"reason": "x"}, [], None)) is None
    # a new rollout on the same directory: issued keeps growing over every document signed
    row2 = rollouts.start(store, key, rel, row["config"], now=NOW + 300)
    assert row2["id"] != row["id"] and opened(rel, rollout_key)["issued"] > doc4["issued"] + 1


def test_a_halt_recorded_without_the_key_is_signed_by_the_next_tick(store, rollout_key, tmp_path):
    key = rollouts.load_key(rollout_key)
    rel, _ = fake_release(tmp_path / "rel")
    row = rollouts.start(store, key, rel, config(), rollout_id="r-test", now=NOW)
    rollouts.act(store, None, "r-test", "halt", "by hand from another machine", now=NOW + 1)
    assert opened(rel, rollout_key)["halted"] is None
    evs = rollouts.tick(store, key, holder="h", now=NOW + 2)
    assert [(e["action"], e["reason"]) for e in evs] == [("sign", "halted")]
    doc = opened(rel, rollout_key)
    assert doc["halted"] == "by hand from another machine" and doc["rollout"] == row["id"]


def test_conclusive_failures_halt_and_fill_the_penalty_box(store, rollout_key, tmp_path):
    key = rollouts.load_key(rollout_key)
    rel, digest = fake_release(tmp_path / "rel")
    first = ids_by_stage([2000, 10000], 200, digest)[0][:8]
    for d in first:
        store.register(d, "00" * 32, board="esp32", interval_s=60, now=NOW)
    rollouts.start(store, key, rel, config(stages_bp=[2000, 10000], max_failure_rate=0.05), rollout_id="r-bad",
                   now=NOW)
    for d in first[:4]:
        store.ingest(batch(d, story(d, digest, "rolled-back")), "00" * 32, now=NOW + 5)
    evs = rollouts.tick(store, key, holder="h", now=NOW + 10)
    assert [e["action"] for e in evs] == ["halt", "sign"] and "4 of 4 attempts failed" in evs[0]["reason"]
    doc = opened(rel, rollout_key)
    assert doc["halted"].startswith("4 of 4 attempts failed") and rolloutdoc.share_at(doc["stages"], doc["issued"]) == 0
    assert sorted(doc["exclude"]) == sorted(first[:4])
    assert store.rollout("r-bad")["state"] == "halted"


def test_the_rollout_key_must_be_private(tmp_path):
    keys.generate(tmp_path / "k")
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(MpotaError, match="may be read by others") as e:
        rollouts.load_key(tmp_path / "k")
    assert e.value.hint == f"chmod 600 {tmp_path / 'k'}"


# ---- end to end: a real server, Reporters standing in for devices ------------------------------

class SimDevice:
    """A device as far as rollouts go: judges rollout.json with the host's reference rules
    (rolloutdoc.open_document + decide), installs when allowed and reports what happened."""

    def __init__(self, url, device_id, secret, healthy=True):
        self.id, self.healthy, self.seen, self.done, self.last_held = device_id, healthy, 0, False, None
        self.reporter = Reporter(url, device_id, bytes.fromhex(secret))

    def check(self, env: bytes, trusted, digest, version):
        if self.done:
            return None
        doc = rolloutdoc.open_document(env, trusted)
        code = rolloutdoc.decide(doc, self.id, board="esp32", release=digest, now=int(time.time()), clock_known=True,
                                 seen=self.seen)
        self.seen = max(self.seen, doc["issued"])
        base = {**BASE, "digest": digest}
        if code is not None:
            if (code, doc["issued"]) != self.last_held:  # held: `checked` with the code, never a failure
                self.reporter.report("checked", **{**base, "code": code, "target": version})
                self.last_held = (code, doc["issued"])
        else:
            self.reporter.report("downloading", **{**base, "target": version})
            self.reporter.report("installed", **{**base, "target": version})
            if self.healthy:
                self.reporter.report("confirmed", **{**base, "version": version, "slot": "ota_1"})
            else:
                self.reporter.report("rolled-back", **{**base, "target": version, "code": "health-failed", "reset": 3})
            self.done = True
        assert self.reporter.flush(), self.reporter.last_status
        return code


def drive(devices, rel_dir, trusted, digest, version, admin, rollout_id, until, timeout=120):
    """Devices check the published document again and again until the rollout's state is one of
    `until`. Returns (the distinct documents seen in order, the final status)."""
    seen_docs, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        env = (rel_dir / "rollout.json").read_bytes()
        doc = rolloutdoc.open_document(env, trusted)  # every document the server signs opens
        if not seen_docs or doc["issued"] != seen_docs[-1]["issued"]:
            seen_docs.append(doc)
        for dev in devices:
            dev.check(env, trusted, digest, version)
        st = admin.rollout(rollout_id)
        if st["rollout"]["state"] in until:
            doc = rolloutdoc.open_document((rel_dir / "rollout.json").read_bytes(), trusted)
            if doc["issued"] != seen_docs[-1]["issued"]:
                seen_docs.append(doc)
            return seen_docs, st
        time.sleep(0.2)
    raise AssertionError(f"rollout {rollout_id} did not reach {until}: {admin.rollout(rollout_id)['decision']}")


def test_rollouts_advance_and_halt_themselves_end_to_end(tmp_path, rollout_key, firmware, signer):
    from mpota import release
    trusted = [keys.load_public(rollout_key.with_name("rollout.pub"))]
    good, bad = tmp_path / "rel-2.0.0", tmp_path / "rel-2.1.0"
    release.build(firmware("2.0.0"), good, [signer], board="esp32")
    release.build(firmware("2.1.0", "unhealthy"), bad, [signer], board="esp32")
    d_good, d_bad = (hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest() for d in (good, bad))
    with start_subprocess(str(tmp_path / "fleet.sqlite"), tmp_path / "token", log=tmp_path / "server.log",
                          args=["--rollout-key", str(rollout_key), "--rollout-interval", "0.2"]) as srv:
        admin = Admin(srv.url, srv.token)
        # 120 devices, at least 5 of them in the unhealthy release's first stage (the buckets
        # depend on the release's digest, which differs from run to run)...
        # and 2 in the healthy one's first stage, so that every document waits for devices
        first = ids_by_stage([500, 10000], 2000, d_bad)[0][:5]
        first += [d for d in ids_by_stage([100, 10000], 2000, d_good)[0] if d not in first][:2]
        names = first + [f"dev-{i:04d}" for i in range(2000) if f"dev-{i:04d}" not in first][:120 - len(first)]
        devices = []
        for name in names:
            sec = new_secret()
            admin.register(name, sec, board="esp32", interval_s=60)
            devices.append(SimDevice(srv.url, name, sec))
        # 1. healthy: 1 % -> 10 % -> 50 % -> 100 %, by itself, as the devices confirm
        st = admin.start_rollout(str(good), stages_bp=[100, 1000, 5000, 10000], min_devices=3, max_failure_rate=0.2,
                                 silent_after_s=600)
        rid = st["rollout"]["id"]
        docs, st = drive(devices, good, trusted, d_good, "2.0.0", admin, rid, ("complete", "halted"))
        assert st["rollout"]["state"] == "complete", st["decision"]
        shares = [rolloutdoc.share_at(d["stages"], d["issued"]) for d in docs]
        assert shares == [100, 1000, 5000, 10000], shares
        issued = [d["issued"] for d in docs]
        assert issued == sorted(set(issued)), issued  # strictly increasing
        assert all(d["release"] == d_good and d["halted"] is None and d["rollout"] == rid for d in docs)
        assert all(dev.done for dev in devices)
        assert st["totals"]["confirmed"] == 120 and st["totals"]["failed"] == 0
        acts = [h["action"] for h in reversed(st["history"])]
        assert acts == ["start", "sign"] + ["advance", "sign"] * 3 + ["complete"], acts
        # 2. unhealthy: halts in its first stage, the document re-signed halted with share 0
        for dev in devices:
            dev.done, dev.healthy, dev.last_held = False, False, None
        st = admin.start_rollout(str(bad), stages_bp=[500, 5000, 10000], min_devices=3, max_failure_rate=0.2,
                                 silent_after_s=600, id="r-unhealthy")
        docs, st = drive(devices, bad, trusted, d_bad, "2.1.0", admin, "r-unhealthy", ("halted", "complete"))
        assert st["rollout"]["state"] == "halted" and st["rollout"]["stage"] == 1, st["rollout"]
        final = docs[-1]
        assert final["halted"] and rolloutdoc.share_at(final["stages"], final["issued"]) == 0
        assert final["issued"] > issued[-1] and [d["issued"] for d in docs] == sorted({d["issued"] for d in docs})
        # the penalty box as of the halt (devices that read the document before it may fail later)
        assert final["exclude"] and set(final["exclude"]) <= {f["device"] for f in st["failures"]}
        assert st["stages"][0]["failed"] >= 3 and st["stages"][1]["attempts"] == 0
        assert st["rollout"]["reason"].startswith(final["halted"][:60])
        print("halted:", st["rollout"]["reason"])
        # every device now holds: rollout-halted, reported as `checked` and never a failure
        assert {dev.check((bad / "rollout.json").read_bytes(), trusted, d_bad, "2.1.0") for dev in devices
                if not dev.done} == {"rollout-halted"}
        # the CLI and the dashboard tell the same story
        out = subprocess.run([sys.executable, "-m", "mpota", "fleet", "rollout", "status", "r-unhealthy", "--server",
                              srv.url, "--token-file", str(tmp_path / "token")], capture_output=True, text=True)
        assert out.returncode == 0 and "r-unhealthy: 2.1.0" in out.stdout and "halted" in out.stdout, out.stderr
        listing = subprocess.run([sys.executable, "-m", "mpota", "fleet", "rollout", "status", "--server", srv.url,
                                  "--token-file", str(tmp_path / "token")], capture_output=True, text=True).stdout
        assert rid in listing and "complete" in listing and "r-unhealthy" in listing
        page = http_get(srv.url + "/rollouts/r-unhealthy", srv.token)
        assert 'id="halt-reason"' in page and ("binomial" in page or "regression" in page), page
        assert 'data-rollout="r-unhealthy"' in http_get(srv.url + "/", srv.token)


def http_get(url, token):
    import urllib.request
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode()


# ---- the CLI, offline (--db), and the dashboard in a browser --------------------------------------

def mpota(*args, ok=True):
    r = subprocess.run([sys.executable, "-m", "mpota", *map(str, args)], capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr + r.stdout
    return r


def test_rollout_cli_verbs_help_and_errors(tmp_path, rollout_key):
    assert all(v in mpota("fleet", "rollout", "--help").stdout for v in ("start", "pause", "resume", "halt", "status"))
    for verb in ("start", "pause", "resume", "halt", "status"):
        assert "usage: mpota fleet rollout " + verb in mpota("fleet", "rollout", verb, "--help").stdout
    assert "--rollout-key" in mpota("fleet", "serve", "--help").stdout
    rel, digest = fake_release(tmp_path / "rel")
    db = tmp_path / "fleet.sqlite"
    common = ["--stages", "1,10,50,100", "--min-devices", "5", "--max-failure-rate", "5%", "--silent-after", "2h"]
    r = mpota("fleet", "rollout", "start", rel, *common, "--db", db, ok=False)
    assert r.returncode == 2 and "give --key FILE" in r.stderr, r.stderr
    r = mpota("fleet", "rollout", "start", rel, "--stages", "10,1", *common[2:], "--db", db, ok=False)
    assert r.returncode == 2 and "stages must grow" in r.stderr, r.stderr
    r = mpota("fleet", "rollout", "start", rel, *common[:6], "--silent-after", "soon", "--db", db, ok=False)
    assert "a duration such as 90s" in r.stderr
    r = mpota("fleet", "rollout", "start", tmp_path, *common, "--db", db, "--key", rollout_key, ok=False)
    assert r.returncode == 2 and "manifest.json" in r.stderr
    out = mpota("fleet", "rollout", "start", rel, *common, "--window", "0 2 * * *,2h,60,15m", "--targets",
                "boards=esp32", "groups=canary", "--valid-for", "12h", "--id", "r-cli", "--db", db, "--key",
                rollout_key).stdout
    assert "rollout r-cli of 2.0.0 started: stage 1 of 4 (1 % of the fleet)" in out
    doc = opened(rel, rollout_key)
    assert doc["window"] == {"cron": "0 2 * * *", "duration_s": 7200, "utc_offset_min": 60, "jitter_s": 900}
    assert doc["targets"] == {"boards": ["esp32"], "groups": ["canary"]} and doc["expires"] - doc["issued"] == 43200
    assert "paused" in mpota("fleet", "rollout", "pause", "r-cli", "--reason", "lunch", "--db", db).stdout
    assert "running" in mpota("fleet", "rollout", "resume", "r-cli", "--db", db).stdout
    r = mpota("fleet", "rollout", "halt", "r-cli", "--db", db, ok=False)
    assert r.returncode == 2 and "--reason" in r.stderr
    out = mpota("fleet", "rollout", "halt", "r-cli", "--reason", "wrong image", "--db", db, "--key", rollout_key).stdout
    assert "halted (wrong image)" in out and opened(rel, rollout_key)["halted"] == "wrong image"
    st = json.loads(mpota("fleet", "rollout", "status", "r-cli", "--json", "--db", db).stdout)
    assert st["rollout"]["state"] == "halted" and [h["action"] for h in st["history"]][:3] == ["sign", "halt", "resume"]
    assert "r-cli" in mpota("fleet", "rollout", "status", "--db", db).stdout
    r = mpota("fleet", "rollout", "status", "r-nope", "--db", db, ok=False)
    assert r.returncode == 2 and "no rollout r-nope" in r.stderr


def test_rollout_pages_in_a_browser(tmp_path, rollout_key):
    from test_fleet_dashboard import Browser, Dom, _chromium
    if _chromium() is None:
        pytest.skip("no chromium: apt-get install chromium (.ci/run installs it as root)")
    from mpota.fleet.server import start_in_thread
    key = rollouts.load_key(rollout_key)
    srv = start_in_thread(str(tmp_path / "fleet.sqlite"))
    try:
        store, now = srv.store, time.time()
        rel, digest = fake_release(tmp_path / "good")
        bad, d_bad = fake_release(tmp_path / "bad", "2.1.0")
        stage_good = ids_by_stage([1000, 10000], 400, digest)
        stage_bad = ids_by_stage([1000, 10000], 400, d_bad)
        for d in sorted(sum(stage_good.values(), [])):  # dev-0000 .. dev-0399
            store.register(d, "00" * 32, board="esp32", interval_s=60, now=now - 100)
        rollouts.start(store, key, rel, config(stages_bp=[1000, 10000], min_devices=3), rollout_id="r-good", now=now - 50)
        rollouts.start(store, key, bad, config(stages_bp=[1000, 10000], min_devices=3, max_failure_rate=0.05),
                       rollout_id="r-bad", now=now - 40)
        for d in stage_good[0][:3]:
            store.ingest(batch(d, story(d, digest, "confirmed")), "00" * 32, now=now - 30)
        for d in [x for x in stage_bad[0] if x not in stage_good[0][:3]][:4]:
            store.ingest(batch(d, story(d, d_bad, "rolled-back", version="2.1.0")), "00" * 32, now=now - 30)
        rollouts.tick(store, key, holder="t", now=now - 20)
        assert store.rollout("r-good")["stage"] == 1 and store.rollout("r-bad")["state"] == "halted"
        b = Browser(tmp_path / "profile")
        b.dom(srv.url + f"/?token={srv.token}")
        dom = Dom(b.dom(srv.url + "/"))
        assert {e["attrs"]["data-rollout"] for e in dom.by() if "data-rollout" in e["attrs"]} == {"r-good", "r-bad"}
        assert dom.by(id="rollouts-link")
        dom = Dom(b.dom(srv.url + "/rollouts"))
        states = {e["attrs"]["data-rollout"]: e["attrs"]["data-state"] for e in dom.found if "data-rollout" in e["attrs"]}
        assert states == {"r-good": "running", "r-bad": "halted"}
        dom = Dom(b.dom(srv.url + "/rollouts/r-bad"))
        assert dom.section("rollout-state") == "halted"
        assert "4 of 4 attempts failed" in dom.section("halt-reason") and dom.section("share").startswith("0 %")
        rows = [" ".join(e["text"].split()) for e in dom.found if e["attrs"].get("class", "").startswith("stage")]
        assert rows[0].startswith("1 10 % ") and " 4 0 100% " in rows[0] + " ", rows
        assert [e["attrs"]["data-action"] for e in dom.found if e["attrs"].get("class") == "history"] == [
            "sign", "halt", "sign", "start"]
        assert len([e for e in dom.found if e["attrs"].get("class") == "rollout-failure"]) == 4
        b.screenshot(srv.url + "/rollouts/r-bad", tmp_path / "rollout-halted.png", size=(1280, 1100))
        if os.environ.get("MPOTA_UPDATE_SCREENSHOT") == "1":  # the README's picture of a halted rollout
            shutil.copyfile(tmp_path / "rollout-halted.png", Path(__file__).resolve().parents[1] / "docs" / "fleet-rollout.png")
        dom = Dom(b.dom(srv.url + "/rollouts/r-good"))
        assert dom.section("rollout-state") == "running" and dom.section("share").startswith("100 %")
        assert dom.by(data_action="hold") or dom.by(data_action="complete")
        b.screenshot(srv.url + "/rollouts/r-good", tmp_path / "rollout-running.png", size=(1280, 1100))
        print(f"screenshots: {tmp_path / 'rollout-halted.png'}, {tmp_path / 'rollout-running.png'}")
    finally:
        srv.stop()


def test_false_alarm_rate_of_the_halting_rule():
    """scripts/rollout_false_alarms.py, smaller: the critical counts are halt_test's decisions at
    the level spent on n attempts, ALPHA / (n (n + 1)); evaluated after every single attempt, a
    release failing exactly at R is halted at most ALPHA of the time, one at 4R nearly always
    (docs/rollout.md has the full table)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import rollout_false_alarms as fa
    assert sum(rollout.alpha_at(n) for n in range(1, 100000)) == pytest.approx(rollout.ALPHA, rel=1e-4)
    k = fa.halt_thresholds(300, 0.05, check=True)
    # at R = 5 %: 2 of 2 never halt (p = 0.0025 > 0.01/6); 3 of 3 do (1.25e-4 < 0.01/12); of 20,
    # 8 give p = 2.9e-6 < 0.01/420 = 2.4e-5, 7 give 3.4e-5 (not below)
    assert k[1] == 301 and k[2] == 301 and k[3] == 3 and k[20] == 8
    every = fa.false_alarm_rate(0.05, 0.05, 300, 1, 4000, thresholds=k)
    bad = fa.false_alarm_rate(0.20, 0.05, 300, 1, 2000, thresholds=k)
    assert every <= rollout.ALPHA and bad > 0.95, (every, bad)


def test_two_server_processes_on_postgresql_act_once(pg_cluster, tmp_path, rollout_key):
    """Two `mpota fleet serve --rollout-key` on one PostgreSQL, both evaluating every 0.1 s: every
    advance happens once, issued only grows, and only the lease holder acts."""
    db = pg_cluster.new_database("rollout2p")
    rel, digest = fake_release(tmp_path / "rel")
    trusted = [keys.load_public(rollout_key.with_name("rollout.pub"))]
    args = ["--rollout-key", str(rollout_key), "--rollout-interval", "0.1"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with start_subprocess(db, tmp_path / "token", log=logs[0], args=args) as a, \
            start_subprocess(db, tmp_path / "token", log=logs[1], args=args) as b:
        admin = Admin(a.url, a.token)
        by_stage = ids_by_stage([500, 2000, 10000], 2000, digest)
        names = by_stage[0][:3] + by_stage[1][:6] + by_stage[2][:51]  # no stage empty
        devices = []
        for i, name in enumerate(names):
            sec = new_secret()
            admin.register(name, sec, board="esp32", interval_s=60)
            devices.append(SimDevice((a, b)[i % 2].url, name, sec))
        rid = admin.start_rollout(str(rel), stages_bp=[500, 2000, 10000], min_devices=2, max_failure_rate=0.2,
                                  silent_after_s=600)["rollout"]["id"]
        docs, st = drive(devices, rel, trusted, digest, VERSION, Admin(b.url, b.token), rid, ("complete", "halted"))
    assert st["rollout"]["state"] == "complete", st["decision"]
    acts = [h["action"] for h in reversed(st["history"])]
    assert acts == ["start", "sign", "advance", "sign", "advance", "sign", "complete"], acts
    issued = [h["issued"] for h in reversed(st["history"]) if h["action"] == "sign"]
    assert issued == sorted(set(issued)) and set(d["issued"] for d in docs) <= set(issued) and len(issued) == 3
    said = [sum(1 for line in p.read_text().splitlines() if ": advance" in line) for p in logs]
    assert sorted(said) == [0, 2], said  # one process evaluated (the lease), the other never acted


def test_a_document_always_fits_a_device():
    long_ids = [f"device-{i:02d}-" + "x" * 50 for i in range(64)]
    with pytest.raises(MpotaError, match="would not fit"):
        config(targets={"devices": long_ids})
    cfg = config(targets={"devices": long_ids[:30]})
    st = {**state(cfg, stage=1), "state": "halted", "reason": "r" * 160}
    body = rollout.document(st, int(NOW), [f"failed-{i:02d}-" + "y" * 50 for i in range(64)])
    env = rolloutdoc.sign(body, keys.Ed25519PrivateKey.generate())
    assert len(env) <= rolloutdoc.MAX_BYTES and 0 < len(body["exclude"]) < 64
    assert body["exclude"][0] == "failed-00-" + "y" * 50  # the first to fail stay in


def test_a_rollout_that_cannot_be_written_does_not_stop_the_others(store, rollout_key, tmp_path):
    key = rollouts.load_key(rollout_key)
    gone, _ = fake_release(tmp_path / "gone")
    rel, _ = fake_release(tmp_path / "rel", "3.0.0")
    rollouts.start(store, key, gone, config(stages_bp=[10000]), rollout_id="r-gone", now=NOW)
    rollouts.start(store, key, rel, config(stages_bp=[5000, 10000]), rollout_id="r-ok", now=NOW)
    (gone / "rollout.json").unlink()
    (gone / "manifest.json").unlink()
    gone.rmdir()
    rollouts.act(store, None, "r-gone", "halt", "pulled", now=NOW + 1)  # needs a signature now
    evs = rollouts.tick(store, key, holder="h", now=NOW + 2)  # r-ok: no device in stage 1 -> advances
    assert {(e["rollout"], e["action"]) for e in evs} == {("r-gone", "error"), ("r-ok", "advance"), ("r-ok", "sign")}
    assert "cannot write" in next(e["reason"] for e in evs if e["action"] == "error")
    assert store.rollout("r-ok")["stage"] == 1 and store.rollout("r-gone")["document"]["halted"] is None


def test_issued_only_from_a_verified_file_and_never_far_ahead_except_a_halt(store, rollout_key, tmp_path, keydir,
                                                                            capsys):
    key = rollouts.load_key(rollout_key)
    rel, _ = fake_release(tmp_path / "rel")
    # a file near 2**40 that this key did not sign: ignored, with a warning
    row = rollouts.start(store, key, rel, config(), rollout_id="r-a", now=NOW)
    doc = dict(opened(rel, rollout_key), issued=2 ** 40 - 10, expires=2 ** 40 - 1)
    (rel / "rollout.json").write_bytes(rolloutdoc.sign(doc, keys.load_private(keydir / "foreign")))
    assert rollouts.file_issued(rel, key.public_key()) == 0
    assert "does not verify" in capsys.readouterr().err
    rollouts.act(store, key, "r-a", "halt", "pulled", now=NOW + 5)
    assert opened(rel, rollout_key)["issued"] == int(NOW) + 5 and store.rollout("r-a")["issued"] == int(NOW) + 5
    # a document this key signed while the clock was 3 days ahead: a new rollout is refused ...
    rel2, _ = fake_release(tmp_path / "rel2", "3.0.0")
    ahead = int(NOW) + 3 * 86400
    rollouts.start(store, key, rel2, config(), rollout_id="r-b", now=ahead)
    rel3, _ = fake_release(tmp_path / "rel3", "4.0.0")
    with pytest.raises(Exception, match="issued") as e:
        rollouts.start(store, key, rel3, config(), rollout_id="r-c", now=NOW + 10)
    assert "clock" in str(e.value.hint) and not (rel3 / "rollout.json").exists()
    # ... but a halt is signed (last + 1) with a warning
    rollouts.act(store, key, "r-b", "halt", "boot loops", now=NOW + 20)
    doc = opened(rel2, rollout_key)
    assert doc["halted"] == "boot loops" and doc["issued"] == ahead + 1
    assert "halt is signed" in capsys.readouterr().err
    assert row["id"] == "r-a"


def test_a_document_written_before_a_failed_commit_is_replaced_at_the_next_tick(store, rollout_key, tmp_path,
                                                                               monkeypatch):
    key = rollouts.load_key(rollout_key)
    rel, _ = fake_release(tmp_path / "rel")
    rollouts.start(store, key, rel, config(stages_bp=[5000, 10000]), rollout_id="r-x", now=NOW)
    rollouts.act(store, key, "r-x", "pause", "wait", now=NOW)  # paused: no tick would sign anything
    before = store.rollout("r-x")

    def fail(*a, **k):
        raise RuntimeError("the database went away at commit")
    with monkeypatch.context() as m:
        m.setattr(store, "_bump", fail)
        with pytest.raises(RuntimeError):
            rollouts.act(store, key, "r-x", "halt", "pulled", now=NOW + 1)
    assert opened(rel, rollout_key)["halted"] == "pulled"  # signed, written, but not committed
    assert store.rollout("r-x")["state"] == "paused" and store.rollout("r-x")["rev"] == before["rev"]
    evs = rollouts.tick(store, key, holder="h", now=NOW + 2)
    assert [(e["action"], e["reason"]) for e in evs] == [("sign", "file")]
    row = store.rollout("r-x")
    doc = opened(rel, rollout_key)
    assert doc == row["document"] and doc["halted"] is None and doc["issued"] > int(NOW) + 1
    assert rollouts.tick(store, key, holder="h", now=NOW + 3) == []  # consistent now: nothing to do
