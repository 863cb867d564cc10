"""The fleet's pure parts, fed directly: batch validation (and a fuzzer: nothing but a Refusal
ever comes out), the statistics (the regression test's false-alarm rate measured under the null
hypothesis), outliers, boot loops, and web server log lines."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_util import rep
from mpota.fleet import logs, monitor, protocol
from mpota.fleet.client import blank_report
from mpota.fleet.protocol import Refusal, encode_batch, parse_batch


# ---- protocol ---------------------------------------------------------------------------------
def test_a_good_batch_parses():
    b = parse_batch(encode_batch("dev-1", [rep(1, "boot"), rep(5, "checked")]), "dev-1")
    assert b.device == "dev-1" and [r["n"] for r in b.reports] == [1, 5]


@pytest.mark.parametrize("mutate, why", [
    (lambda d: d.update(device="other"), "X-Mpota-Device"),
    (lambda d: d.update(reports=[]), "list of 1 to 16"),
    (lambda d: d.update(reports=[blank_report(i + 1, "boot") for i in range(17)]), "list of 1 to 16"),
    (lambda d: d.update(extra=1), "nothing else"),
    (lambda d: d["reports"].append(rep(1, "boot")), "not above"),
    (lambda d: d["reports"][0].update(n=0), "n is an integer"),
    (lambda d: d["reports"][0].update(n=True), "n is an integer"),
    (lambda d: d["reports"][0].update(event="exploded"), "event is one of"),
    (lambda d: d["reports"][0].pop("heap"), "missing heap"),
    (lambda d: d["reports"][0].update(heap=-1), "heap"),
    (lambda d: d["reports"][0].update(heap=1.5), "heap"),
    (lambda d: d["reports"][0].update(detail="x" * 161), "detail"),
    (lambda d: d["reports"][0].update(version=""), "version"),
    (lambda d: d["reports"][0].update(digest="ABC"), "digest"),
    (lambda d: d["reports"][0].update(slots={"ota_0": "happy"}), "slots"),
    (lambda d: d["reports"][0].update(bogus=1), "unknown field"),
])
def test_bad_batches_say_why(mutate, why):
    doc = {"device": "dev-1", "reports": [rep(2, "boot")]}
    mutate(doc)
    with pytest.raises(Refusal) as e:
        parse_batch(json.dumps(doc).encode(), "dev-1")
    assert e.value.reason == "bad-report" and e.value.status == 400 and why in e.value.detail


def test_not_json_and_too_large():
    for body in (b"\xff\xfe", b"{", b"NaN", b'{"device": "d", "reports": [{"n": Infinity}]}', b"[" * 5000):
        with pytest.raises(Refusal) as e:
            parse_batch(body, "d")
        assert e.value.reason in ("bad-report", "too-large")
    with pytest.raises(Refusal) as e:
        parse_batch(b" " * 4097, "d")
    assert e.value.reason == "too-large" and e.value.status == 413


def test_the_mac_is_hmac_sha256_of_the_raw_body():
    import hashlib
    import hmac
    body, key = b'{"device":"d","reports":[]}', bytes(range(32))
    assert protocol.sign(key, body) == hmac.new(key, body, hashlib.sha256).hexdigest()
    assert protocol.mac_ok(key, body, protocol.sign(key, body).upper())
    assert not protocol.mac_ok(key, body + b" ", protocol.sign(key, body))
    assert not protocol.mac_ok(key, body, None) and not protocol.mac_ok(key, body, "zz")


_json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
                            | st.text(max_size=40),
                            lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                                         max_size=6), max_leaves=30)


def _report_like():
    field = st.sampled_from(protocol.FIELDS + ("zz",))
    return st.dictionaries(field, _json_values, max_size=17).map(lambda d: {**rep(1, "boot"), **d})


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=600),
                 _json_values.map(lambda v: json.dumps(v).encode()),
                 st.lists(_report_like(), max_size=4).map(lambda rs: json.dumps({"device": "d", "reports": rs}).encode())))
def test_fuzzed_bodies_are_parsed_or_refused_never_crash(body):
    try:
        b = parse_batch(body, "d")
    except Refusal as e:
        assert e.reason in ("bad-report", "too-large")
        return
    for r in b.reports:  # what passes is exactly the protocol's shape
        assert set(r) == set(protocol.FIELDS) and r["event"] in protocol.EVENTS


# ---- statistics -------------------------------------------------------------------------------
def _attempt(dev, release, outcome, board="esp32", t=0.0):
    return {"device": dev, "release": release, "board": board, "cohort": "default", "outcome": outcome,
            "started_at": t, "installed_at": t + 5 if outcome != "refused" else None,
            "confirmed_at": t + 35 if outcome == "confirmed" else None,
            "rolled_back_at": t + 60 if outcome == "rolled-back" else None, "code": None}


def _fleet(n_prev, f_prev, n_new, f_new, board="esp32"):
    rows = []
    for i in range(n_prev):
        rows.append(_attempt(f"p{board}{i}", "1.0.0", "rolled-back" if i < f_prev else "confirmed", board))
    for i in range(n_new):
        rows.append(_attempt(f"n{board}{i}", "1.1.0", "rolled-back" if i < f_new else "confirmed", board))
    return rows


def test_a_release_that_fails_much_more_often_is_an_alarm():
    [t] = monitor.regressions(_fleet(200, 4, 50, 10))
    assert t["alarm"] and t["release"] == "1.1.0" and t["previous"] == "1.0.0" and t["p_value"] < 1e-4
    assert "Fisher" in t["reason"]
    [t] = monitor.regressions(_fleet(200, 4, 50, 2))
    assert not t["alarm"]


def test_the_false_alarm_rate_under_the_null_is_at_most_alpha():
    """Both releases fail with the same probability: over many simulated rollouts of several
    boards at once (Holm over the boards), the share of evaluations raising any alarm stays at
    most alpha (Fisher's test is conservative, so it is below)."""
    rng = random.Random(1234)
    runs, alarms = 1000, 0
    for _ in range(runs):
        rows = []
        for board in ("esp32", "esp32s3", "esp32c3"):
            p = rng.choice((0.02, 0.05, 0.1))
            n0, n1 = rng.randint(30, 150), rng.randint(10, 100)
            f0 = sum(rng.random() < p for _ in range(n0))
            f1 = sum(rng.random() < p for _ in range(n1))
            rows += _fleet(n0, f0, n1, f1, board)
        alarms += any(t["alarm"] for t in monitor.regressions(rows))
    print(f"false alarms under the null: {alarms} of {runs} evaluations (alpha {monitor.ALPHA})")
    assert alarms / runs <= monitor.ALPHA


def test_holm_is_stricter_than_one_test():
    assert monitor._holm([0.004, 0.03], 0.01) == [True, False]
    assert monitor._holm([0.006, 0.006], 0.01) == [False, False]  # 0.006 > 0.01 / 2
    assert monitor._holm([0.004, 0.009], 0.01) == [True, True]


def test_release_stats_rates_and_times():
    rows = _fleet(0, 0, 10, 2) + [_attempt("r1", "1.1.0", "refused"), _attempt("s1", "1.1.0", "failed-silent")]
    [r] = monitor.release_stats(rows)
    assert (r["devices"], r["installed"], r["confirmed"], r["rolled_back"], r["refused"], r["failed_silent"]) == \
        (12, 11, 8, 2, 1, 1)
    assert r["rollback_rate"] == round(2 / 11, 4) and r["confirm_s"]["median"] == 30.0 and r["install_s"]["median"] == 5
    assert r["failure_rate"] == round(3 / 11, 4)
    assert [(g["board"], g["cohort"], g["devices"]) for g in r["groups"]] == [("esp32", "default", 12)]


def test_versions_order_as_people_read_them():
    vs = ["1.10.0", "1.9.0", "1.9.0-rc1", "2.0", "1.2.3"]
    assert sorted(vs, key=monitor.version_key) == ["1.2.3", "1.9.0", "1.9.0-rc1", "1.10.0", "2.0"]


def test_outliers_by_median_and_mad():
    devices = [{"id": f"d{i}", "version": "2.0.0", "board": "esp32", "heap": 100000 + 500 * (i % 5)} for i in range(20)]
    devices.append({"id": "leaky", "version": "2.0.0", "board": "esp32", "heap": 41000})
    devices.append({"id": "roomy", "version": "2.0.0", "board": "esp32", "heap": 180000})  # high heap is fine
    activity = [{"device": d["id"], "crash_resets": 0} for d in devices]
    activity[3]["crash_resets"] = 4
    rows = [_attempt(d["id"], "2.0.0", "confirmed") for d in devices]
    rows[5]["confirmed_at"] = rows[5]["installed_at"] + 600
    found = {(o["metric"], o["device"]) for o in monitor.outliers(devices, rows, activity)}
    assert found == {("heap", "leaky"), ("crash_resets", "d3"), ("confirm_s", "d5")}


def test_too_few_peers_no_judgement():
    devices = [{"id": f"d{i}", "version": "2", "board": "b", "heap": h} for i, h in enumerate([100, 100, 100, 1])]
    assert monitor.outliers(devices, [], []) == []


def test_boot_loops():
    act = [{"device": "ok", "boots_min": 3, "boots_max": 4, "rollbacks": 0, "crash_resets": 0},
           {"device": "looping", "boots_min": 10, "boots_max": 19, "rollbacks": 0, "crash_resets": 0},
           {"device": "flapping", "boots_min": 1, "boots_max": 2, "rollbacks": 2, "crash_resets": 0},
           {"device": "crashing", "boots_min": None, "boots_max": None, "rollbacks": 0, "crash_resets": 3}]
    assert [x["device"] for x in monitor.boot_loops(act)] == ["looping", "flapping", "crashing"]


def test_progress_counts_up_over_time():
    rows = [_attempt("a", "2", "confirmed", t=0.0), _attempt("b", "2", "rolled-back", t=100.0)]
    p = monitor.progress(rows, {}, now=200.0, points=5)
    assert p["series"]["installed"] == [0, 1, 1, 2, 2] and p["series"]["confirmed"][-1] == 1
    assert p["series"]["rolled_back"] == [0, 0, 0, 0, 1]  # rolled back at 160


# ---- web server logs --------------------------------------------------------------------------
def test_common_and_combined_log_lines():
    lines = [
        '192.0.2.1 - - [01/Jun/2025:12:00:00 +0200] "GET /rel/manifest.json?d=dev1&v=1.0.0&r=rolled-back%3Ahealth-failed '
        'HTTP/1.1" 200 712',
        '192.0.2.2 - - [01/Jun/2025:12:00:01 +0000] "GET /manifest.json HTTP/1.1" 304 - "-" '
        '"mpota/0.1.0 (d=dev2; v=2.0.0; r=confirmed)"',
        '192.0.2.3 - - [01/Jun/2025:12:00:02 +0000] "GET /manifest.json?d=dev3 HTTP/1.1" 200 1 "-" '
        '"mpota/0.1.0 (d=ignored; v=3.0.0; r=up-to-date)"',
        '192.0.2.4 - - [01/Jun/2025:12:00:03 +0000] "GET /index.html HTTP/1.1" 200 1 "-" "curl/8"',
        'garbage',
        '192.0.2.5 - - [01/Jun/2025:12:00:04 +0000] "GET /m.json?d=bad%20id HTTP/1.1" 200 1',
    ]
    res = logs.parse(lines)
    got = {rep["device"]: (at, rep["version"], rep["result"], rep["code"]) for at, rep, _ in res.items}
    assert got == {"dev1": (1748772000.0, "1.0.0", "rolled-back:health-failed", "health-failed"),
                   "dev2": (1748779201.0, "2.0.0", "confirmed", None),
                   "dev3": (1748779202.0, "3.0.0", "up-to-date", None)}  # the query string names it, the UA fills in
    assert res.lines == 6 and res.skipped == {"no device named": 1, "not Common/Combined Log Format": 1,
                                              "bad device id": 1}
