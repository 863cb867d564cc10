"""Rollout documents on the device (docs/rollout.md, issue 12): the agent's rules (ota/rollout.py,
ota/window.py, ota/clock.py, run as .mpy in the real micropython binary) agree with the host's
(mpota.rolloutdoc) over thousands of generated documents, devices and times; and end to end, a
simulated device with a rollout role installs a release only as its signed rollout.json allows,
every refusal leaving the flash as it was."""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import random
import shutil

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import Server, agent_lines
from mpota import deviceconfig, dsse, keys, rolloutdoc
from mpota.sim import runner

T0 = 1796083200  # 2026-12-01T00:00:00Z
DAY = 86400


# ---- host and device agree ------------------------------------------------------------------

HARNESS = r"""
from ota.rollout import decide, bucket, check
from ota.window import is_open, check as wcheck, parse
from ota.clock import days_from_civil
from ota.window import civil
for c in cases():
    k = c["kind"]
    if k == "decide":
        r = decide(c["doc"], c["did"], c["board"], c["groups"], c["release"], c["now"], c["known"], c["seen"],
                   c["dwin"])
        print(json.dumps([r, bucket(c["did"], c["release"])]))
    elif k == "window":
        print(json.dumps(is_open(c["w"], c["now"], c["jit"])))
    elif k == "wcheck":
        try:
            wcheck(c["w"])
            print("ok")
        except ValueError:
            print("bad")
    elif k == "doc":
        try:
            check(c["doc"])
            print("ok")
        except Exception as e:
            print(getattr(e, "code", repr(e)))
    elif k == "date":
        d = days_from_civil(c["y"], c["m"], c["d"])
        print(json.dumps([d, list(civil(d))]))
"""


def on_device(agent, tmp_path, cases):
    return agent_lines(HARNESS, agent, tmp_path, cases, heap="256K")


def _cron_field(rng, lo, hi):
    def one():
        a = rng.randint(lo, hi)
        b = rng.randint(a, hi)
        return rng.choice([str(a), f"{a}-{b}", f"*/{rng.randint(1, 12)}", f"{a}-{b}/{rng.randint(1, 5)}", "*"])
    if rng.random() < 0.35:
        return "*"
    return ",".join(one() for _ in range(rng.randint(1, 3)))


def random_cron(rng):
    return " ".join(_cron_field(rng, lo, hi) for lo, hi in rolloutdoc._CRON_RANGES)


def random_window(rng):
    return {"cron": random_cron(rng), "duration_s": rng.choice([60, 600, 3600, 7200, 86400, rng.randint(60, 86400)]),
            "utc_offset_min": rng.choice([0, 60, -300, 840, -720, rng.randint(-720, 840)]),
            "jitter_s": rng.choice([0, 0, 900, 86400, rng.randint(0, 86400)])}


RELEASE = hashlib.sha256(b"the release").hexdigest()
BOARDS = ["esp32", "esp32s3", "unix"]
GROUPS = ["canary", "line-3", "line-4", "lab"]


def random_case(rng):
    issued = T0 + rng.randint(-10 * DAY, 10 * DAY)
    expires = issued + rng.choice([1, 3600, DAY, 7 * DAY])
    stages, at = [], issued - rng.randint(0, DAY)
    for _ in range(rng.randint(1, 4)):
        at += rng.choice([0, 3600, DAY])
        stages.append({"at": at, "share_bp": rng.choice([0, 1, 100, 1000, 5000, 9999, 10000, rng.randint(0, 10000)])})
    dids = [f"dev-{i}" for i in range(6)] + ["240ac4000001"]
    targets = None
    if rng.random() < 0.5:
        targets = {}
        for k, pool in (("boards", BOARDS), ("groups", GROUPS), ("devices", dids)):
            if rng.random() < 0.5:
                targets[k] = rng.sample(pool, rng.randint(0, 2))
    doc = rolloutdoc.build(RELEASE if rng.random() < 0.9 else hashlib.sha256(b"other").hexdigest(), "2.0.0",
                           "r-1", issued, expires, stages,
                           halted="stop" if rng.random() < 0.1 else None, targets=targets,
                           exclude=rng.sample(dids, rng.randint(0, 2)) if rng.random() < 0.3 else [],
                           window=random_window(rng) if rng.random() < 0.4 else None)
    known = rng.random() < 0.7
    now = issued + rng.randint(-2 * DAY, 9 * DAY) if known else rng.choice([0, rolloutdoc.CLOCK_FLOOR - 1])
    seen = rng.choice([0, 0, issued - 1, issued, issued + 1, issued + 3 * DAY])
    return {"kind": "decide", "doc": doc, "did": rng.choice(dids + [f"x{rng.randint(0, 10 ** 9)}"]),
            "board": rng.choice(BOARDS), "groups": rng.sample(GROUPS, rng.randint(0, 2)), "release": RELEASE,
            "now": now, "known": known, "seen": seen, "dwin": random_window(rng) if rng.random() < 0.3 else None}


def host_decide(c):
    return rolloutdoc.decide(c["doc"], c["did"], board=c["board"], groups=c["groups"], release=c["release"],
                             now=c["now"], clock_known=c["known"], seen=c["seen"], device_window=c["dwin"])


def test_the_device_decides_as_the_host_over_generated_documents_devices_and_times(agent, tmp_path):
    rng = random.Random(12)
    cases = [random_case(rng) for _ in range(2500)]
    got = on_device(agent, tmp_path, cases)
    codes = set()
    for c, line in zip(cases, got):
        code, b = json.loads(line)
        assert b == rolloutdoc.bucket(c["did"], c["release"]), c
        assert code == host_decide(c), c
        codes.add(code)
    # the grid reaches every code of the decision (the signature codes are the envelope's)
    assert codes >= {None, "rollout-other-release", "rollout-replayed", "rollout-expired", "rollout-halted",
                     "not-in-rollout", "no-clock", "outside-window"}, codes


def test_the_share_boundary_and_the_bucket_are_exact(agent, tmp_path):
    # a device whose bucket sits just below / at a share's boundary, found on the host
    cases = []
    for i in range(400):
        did = f"edge-{i}"
        b = rolloutdoc.bucket(did, RELEASE)
        share = (b * rolloutdoc.FULL_BP >> 32) + (i % 3)  # below, just at, and just above the bucket
        doc = rolloutdoc.build(RELEASE, "2.0.0", "r", T0, T0 + DAY, [{"at": T0, "share_bp": min(share, 10000)}])
        cases.append({"kind": "decide", "doc": doc, "did": did, "board": "esp32", "groups": [], "release": RELEASE,
                      "now": T0 + 1, "known": True, "seen": 0, "dwin": None})
    got = on_device(agent, tmp_path, cases)
    for c, line in zip(cases, got):
        assert json.loads(line)[0] == host_decide(c), c
    assert {json.loads(x)[0] for x in got} == {None, "not-in-rollout"}


def test_maintenance_windows_agree_with_the_host(agent, tmp_path):
    rng = random.Random(7)
    cases = []
    for _ in range(2000):
        w = random_window(rng)
        now = T0 + rng.randint(-400 * DAY, 400 * DAY) + rng.randint(0, DAY)
        cases.append({"kind": "window", "w": w, "now": now, "jit": rng.choice([0, rng.randint(0, w["jitter_s"])])})
    # leap days, year ends, a window across midnight and across a month's end, DOM/DOW both restricted
    for cron in ("0 23 29 2 *", "30 23 31 12 *", "0 0 1 1 *", "0 22 * * 0", "0 2 13 * 5", "*/15 * * * 1-5"):
        for day in range(-3, 1500, 7):
            for sec in (0, 3600, 7199, 82800, 86399):
                cases.append({"kind": "window", "w": {"cron": cron, "duration_s": 7200, "utc_offset_min": 0},
                              "now": 1704067200 + day * DAY + sec, "jit": 0})
    got = on_device(agent, tmp_path, cases)
    opened = 0
    for c, line in zip(cases, got):
        want = rolloutdoc.window_open(c["w"], c["now"], c["jit"])
        assert json.loads(line) == want, c
        opened += want
    assert 0 < opened < len(cases)


BAD_CRONS = ["", "0 2 * *", "0 2 * * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "* * 32 * *", "* * * 0 *",
             "* * * 13 *", "* * * * 7", "*/0 * * * *", "5-1 * * * *", "a * * * *", "1,,2 * * * *", "1- * * * *",
             "-1 * * * *", "1-2-3 * * * *", "1/2/3 * * * *", "* * * * MON", 5, "\u0665 * * * *",
             "0\u00a02 * * *", "0x5 * * * *"]
# spelled as Python's int() spells numbers, on both sides
ODD_CRONS = ["+5 * * * *", "1_0 * * * *", "05 02 * * 0", "*/+5 * * * *"]


def test_windows_both_refuse(agent, tmp_path):
    good = [random_window(random.Random(i)) for i in range(200)] + [{"cron": c, "duration_s": 60} for c in ODD_CRONS]
    bad = [{"cron": c, "duration_s": 3600} for c in BAD_CRONS]
    bad += [{"cron": "0 2 * * *", "duration_s": d} for d in (59, 86401, "3600", None, True, 1.5)]
    bad += [{"cron": "0 2 * * *", "duration_s": 3600, "utc_offset_min": v} for v in (-721, 841, False)]
    bad += [{"cron": "0 2 * * *", "duration_s": 3600, "jitter_s": v} for v in (-1, 86401, True)]
    bad += [None, [], "0 2 * * *"]
    cases = [{"kind": "wcheck", "w": w} for w in good + bad]
    got = on_device(agent, tmp_path, cases)
    for w, line in zip(good + bad, got):
        try:
            rolloutdoc.check_window(w)
            want = "ok"
        except (rolloutdoc.RolloutError, TypeError, AttributeError):
            want = "bad"
        assert line == want, w
    assert got.count("ok") == len(good)


def test_malformed_documents_are_rollout_bad_on_the_device_as_on_the_host(agent, tmp_path):
    base = rolloutdoc.build(RELEASE, "2.0.0", "r-1", T0, T0 + DAY, [{"at": T0, "share_bp": 100}],
                            targets={"boards": ["esp32"]}, window={"cron": "0 2 * * *", "duration_s": 7200})
    changes = [{"schema": 2}, {"schema": None}, {"release": RELEASE.upper()}, {"release": RELEASE[:63]},
               {"release": 5}, {"version": ""}, {"version": 1}, {"rollout": "x" * 65}, {"issued": T0 + DAY},
               {"issued": "1"}, {"expires": True}, {"issued": 0}, {"stages": []},
               {"stages": [{"at": T0, "share_bp": 10001}]}, {"stages": [{"at": T0}]},
               {"stages": [{"at": T0, "share_bp": 1}, {"at": T0 - 1, "share_bp": 2}]},
               {"stages": [{"at": T0, "share_bp": 1}] * 17}, {"stages": {"at": T0}}, {"halted": 3},
               {"halted": "x" * 161}, {"targets": []}, {"targets": {"boards": "esp32"}},
               {"targets": {"devices": [""]}}, {"targets": {"groups": ["g"] * 65}}, {"exclude": ["d"] * 65},
               {"exclude": "dev-1"}, {"window": {"cron": "0 2 * *", "duration_s": 7200}},
               {"window": {"cron": "0 2 * * *", "duration_s": 10}}, {"window": "0 2 * * *"}]
    docs = [base, dict(base, halted="bad build"), dict(base, targets=None, window=None, exclude=None)]
    docs += [dict(base, **ch) for ch in changes]
    got = on_device(agent, tmp_path, [{"kind": "doc", "doc": d} for d in docs])
    for d, line in zip(docs, got):
        try:
            rolloutdoc.check(d)
            want = "ok"
        except rolloutdoc.RolloutError as e:
            want = e.code
        assert line == want, (d, line)
    assert got[:3] == ["ok"] * 3 and set(got[3:]) == {"rollout-bad"}


def test_dates_the_clock_and_the_windows_compute_are_the_calendars(agent, tmp_path):
    days = list(range(-800, 30000, 37)) + [10956, 11016, 11017, 19723, 19782, 19783, 20454, 24837]
    dates = [datetime.date(1970, 1, 1) + datetime.timedelta(days=d) for d in days]
    got = on_device(agent, tmp_path, [{"kind": "date", "y": x.year, "m": x.month, "d": x.day} for x in dates])
    for d, x, line in zip(days, dates, got):
        assert json.loads(line) == [d, [x.year, x.month, x.day]], x


# ---- end to end: a simulated device with a rollout role ---------------------------------------

@pytest.fixture(scope="module")
def rollout_keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("rollout-keys")
    keys.generate(d / "rollout")
    return d / "rollout.pub", keys.load_private(d / "rollout")


def envelope_digest(server) -> str:
    return hashlib.sha256((server.root / "manifest.json").read_bytes()).hexdigest()


def put_doc(server, key, *, issued=None, expires=None, share_bp=10000, release=None, **kw) -> dict:
    issued = issued or T0
    body = rolloutdoc.build(release or envelope_digest(server), "2.0.0", "r-1", issued, expires or issued + 30 * DAY,
                            [{"at": issued - DAY, "share_bp": share_bp}], **kw)
    (server.root / "rollout.json").write_bytes(rolloutdoc.sign(body, key))
    return body


def net_time(monkeypatch, when):
    monkeypatch.setenv(runner.NET_TIME_ENV, when)


@pytest.fixture
def rollout_device(make_device, firmware, server, signer, rollout_keys, monkeypatch):
    """A device on 1.0.0 with a rollout role, NTP configured (the network time: 2026-12-01T12:00Z),
    and release 2.0.0 published on `server`."""
    def make(name="dev", ntp="pool.ntp.org", groups=(), window=None, urls=None, **kw):
        settings = deviceconfig.rollout_settings([rollout_keys[0]], list(groups), ntp, window)
        d = make_device(firmware("1.0.0"), urls or server.url, name=name, rollout=settings, **kw)
        d.config(timeout_s=2)
        return d
    server.publish(firmware("2.0.0"), signer)
    net_time(monkeypatch, "2026-12-01T12:00Z")
    return make


def held(d, code, result="skipped"):
    st = d.status()
    assert (st["version"], st["last_result"], st["last_error"]) == ("1.0.0", result, code), d.output
    return st


def test_each_refusal_ends_in_its_code_and_leaves_the_flash_as_it_was(rollout_device, server, signer, rollout_keys,
                                                                       monkeypatch):
    key = rollout_keys[1]
    d = rollout_device(device_id="dev-7")
    before = d.flash()
    env = envelope_digest(server)

    def check(code, result="skipped"):
        d.run()
        held(d, code, result)
        assert d.flash() == before, code
        assert f"{code}" in d.output

    check("rollout-missing")                                  # no rollout.json: held, not ignored
    # (mpota serve serves only DSSE envelopes beside a manifest: garbage there is a 404)
    (server.root / "rollout.json").write_bytes(dsse.sign(b"<html>not json</html>", [key], rolloutdoc.PAYLOAD_TYPE))
    check("rollout-bad", "refused")
    (server.root / "rollout.json").write_bytes(dsse.sign(b"{}", [key]))  # a manifest's payloadType
    check("rollout-bad", "refused")
    (server.root / "rollout.json").write_bytes(rolloutdoc.sign(
        rolloutdoc.build(env, "2.0.0", "r", T0, T0 + DAY, [{"at": T0, "share_bp": 10000}]), signer))
    check("rollout-unknown-key", "refused")                   # the release key cannot sign a rollout
    put_doc(server, key, issued=T0 + 1)                        # changed after signing
    signed = json.loads((server.root / "rollout.json").read_bytes())
    body = json.loads(base64.b64decode(signed["payload"]))
    signed["payload"] = base64.b64encode(json.dumps(dict(body, exclude=["dev-1"])).encode()).decode()
    (server.root / "rollout.json").write_text(json.dumps(signed))
    check("rollout-bad-signature", "refused")
    put_doc(server, key, release=hashlib.sha256(b"another release").hexdigest())
    check("rollout-other-release")
    put_doc(server, key, issued=T0 + 100, halted="boot loop on line 3")
    check("rollout-halted")
    assert d.state()["rollout_seen"] == T0 + 100
    put_doc(server, key, issued=T0 + 50)                       # the document from before the halt
    check("rollout-replayed")
    put_doc(server, key, issued=T0 + 200, share_bp=0)
    check("not-in-rollout")
    put_doc(server, key, issued=T0 + 300, targets={"groups": ["canary"]})
    check("not-in-rollout")
    put_doc(server, key, issued=T0 + 400, exclude=["dev-7"])
    check("not-in-rollout")
    put_doc(server, key, issued=T0 + 500, expires=T0 + 600)     # the network time is T0 + 12 h
    check("rollout-expired")
    put_doc(server, key, issued=T0 + 700, window={"cron": "0 2 * * *", "duration_s": 7200})
    net_time(monkeypatch, "off")                                # NTP unreachable, the RTC starts at 2000
    check("no-clock")
    assert "ntp pool.ntp.org" in d.output
    # ota.check() answers the same, and changes nothing
    cmd = "import simfs; simfs.mount()\nimport ota\nprint(ota.check())"
    env = runner.firmware_env(d.dev, d.dev.running, MPOTA_NET_TIME="off")
    rc, out = runner.run_micropython(d.dev, ["-c", cmd], env, d.dev.heap)
    assert rc == 0 and "'error': 'no-clock'" in out and "'update': False" in out, out
    assert d.state()["rollout_seen"] == T0 + 700 and d.flash() == before


def test_held_is_not_a_failure_no_back_off_and_a_later_document_installs(rollout_device, server, rollout_keys):
    d = rollout_device()
    put_doc(server, rollout_keys[1], share_bp=0)
    for _ in range(3):
        d.run()
        held(d, "not-in-rollout")
    st = d.state()
    assert st["backoff"] is None and st["rejected"] == [], st
    put_doc(server, rollout_keys[1], issued=T0 + 1, share_bp=10000)
    d.run()
    assert d.status()["version"] == "2.0.0", d.output
    assert d.state()["rollout_seen"] == T0 + 1


def test_expired_needs_a_clock_without_one_the_first_document_bounds_the_rest(rollout_device, server, rollout_keys,
                                                                               monkeypatch):
    # expired by the network's time (2026-12-01T12:00Z) but not by anything the device knows
    d = rollout_device(ntp=None)
    put_doc(server, rollout_keys[1], issued=T0 - 10 * DAY, expires=T0 - 9 * DAY)
    d.run()
    assert d.status()["version"] == "2.0.0", d.output
    d2 = rollout_device(name="dev2")                   # with NTP: refused
    d2.run()
    held(d2, "rollout-expired")


def test_without_a_rollout_role_rollout_json_is_ignored(make_device, firmware, server, signer, rollout_keys):
    server.publish(firmware("2.0.0"), signer)
    put_doc(server, rollout_keys[1], halted="would hold a device with the role")
    d = make_device(firmware("1.0.0"), server.url)
    d.run()
    assert d.status()["version"] == "2.0.0", d.output


def test_a_rollout_key_cannot_sign_a_manifest(rollout_device, server, firmware, rollout_keys):
    signed = json.loads((server.root / "manifest.json").read_bytes())
    server.write_manifest_body(base64.b64decode(signed["payload"]), rollout_keys[1])  # signed by the rollout key
    put_doc(server, rollout_keys[1])
    d = rollout_device()
    before = d.flash()
    d.run()
    held(d, "unknown-key", "refused")
    assert d.flash() == before


def test_outside_the_window_it_downloads_then_installs_inside_without_downloading_again(
        rollout_device, server, rollout_keys, monkeypatch):
    window = {"cron": "0 2 * * *", "duration_s": 7200, "utc_offset_min": 60}  # 01:00-03:00 UTC
    d = rollout_device()
    put_doc(server, rollout_keys[1], window=window)
    otadata = d.otadata()
    net_time(monkeypatch, "2026-12-01T12:00Z")
    d.run()
    held(d, "outside-window")
    assert d.otadata() == otadata, "nothing set to boot outside the window"
    assert d.state()["progress"]["verified"] == 1
    # the payload is gone from the server: the next check cannot download it again
    for f in server.root.iterdir():
        if f.name not in ("manifest.json", "rollout.json"):
            f.unlink()
    net_time(monkeypatch, "2026-12-01T23:59Z")  # still outside: nothing downloaded, nothing read
    d.run()
    held(d, "outside-window")
    assert d.otadata() == otadata and "checking it again" not in d.output
    net_time(monkeypatch, "2026-12-02T01:30Z")
    d.run()
    st = d.status()
    assert st["version"] == "2.0.0", d.output
    assert "checking it again" in d.output and "installing" not in d.output


def test_a_window_that_closes_during_the_download_holds_the_install(rollout_device, server, rollout_keys,
                                                                     firmware, signer, monkeypatch):
    # Open when the document is judged (02:59:58, window 02:00-03:00 UTC), closed by the time the
    # payload is in the slot: a server that sends one byte every 0.5 ms makes the 8 KiB download
    # last at least 4 s, whatever the machine. The window is judged again before set_boot().
    from faultserver import Fault, FaultServer
    server.publish(firmware("2.0.0", size=8 * 1024), signer)
    put_doc(server, rollout_keys[1], window={"cron": "0 2 * * *", "duration_s": 3600})
    slow = FaultServer(server.root).start()
    try:
        slow.faults = [Fault(path=".bin", trickle=0.0005)]
        d = rollout_device(urls=slow.url)
        otadata = d.otadata()
        net_time(monkeypatch, "2026-12-01T02:59:58Z")
        d.run()
        st = held(d, "outside-window")
        assert "closed during the download" in st["detail"], st
        assert d.otadata() == otadata, "nothing set to boot once the window had closed"
        assert d.state()["progress"]["verified"] == 1
        slow.faults = []
        net_time(monkeypatch, "2026-12-02T02:10Z")  # the next window: set to boot, no download
        d.run()
        assert d.status()["version"] == "2.0.0", d.output
        assert "checking it again" in d.output and "installing" not in d.output
    finally:
        slow.stop()


def test_the_device_window_applies_with_the_documents(rollout_device, server, rollout_keys, monkeypatch):
    d = rollout_device(window=deviceconfig.parse_window("0 3 * * *,3600"))
    put_doc(server, rollout_keys[1], window={"cron": "0 2 * * *", "duration_s": 7200})  # 02:00-04:00
    net_time(monkeypatch, "2026-12-02T02:30Z")  # the document's is open, the device's is not
    d.run()
    held(d, "outside-window")
    net_time(monkeypatch, "2026-12-02T03:10Z")
    d.run()
    assert d.status()["version"] == "2.0.0", d.output


def test_a_bad_rollout_document_on_the_primary_fails_over_to_the_mirror(rollout_device, server, rollout_keys,
                                                                        tmp_path, signer):
    mirror_root = tmp_path / "mirror"
    shutil.copytree(server.root, mirror_root)
    mirror = Server(mirror_root)
    try:
        put_doc(mirror, rollout_keys[1])
        (server.root / "rollout.json").write_bytes(rolloutdoc.sign(
            rolloutdoc.build(envelope_digest(server), "2.0.0", "r", T0, T0 + DAY, [{"at": T0, "share_bp": 10000}]),
            Ed25519PrivateKey.generate()))   # signed by a stranger
        d = rollout_device(mirrors=[mirror.url])
        d.run()
        assert d.status()["version"] == "2.0.0", d.output
        assert "rollout-unknown-key" in d.output
    finally:
        mirror.httpd.shutdown()
        mirror.httpd.server_close()


def test_an_older_document_on_the_first_source_does_not_outrun_a_halt_on_the_second(rollout_device, server,
                                                                                   rollout_keys, tmp_path):
    # A stale (or replaying) mirror listed first still serves the document from before the
    # halt; the origin, listed second, serves the halt. Judged in that order in one check, the
    # stale document must not install the release: the newer document seen in the same check
    # supersedes it, and the next check refuses the stale one as a replay.
    mirror_root = tmp_path / "mirror"
    shutil.copytree(server.root, mirror_root)
    mirror = Server(mirror_root)
    try:
        put_doc(mirror, rollout_keys[1], issued=T0)                     # before the halt: 100 %
        put_doc(server, rollout_keys[1], issued=T0 + 60, halted="2 of 2 failed")
        d = rollout_device(urls=mirror.url, mirrors=[server.url])
        d.run()
        held(d, "rollout-halted")  # the answer is the newest document's
        d.run()  # the next check: the mirror's document is refused as a replay, the origin's halts
        st = d.status()
        assert (st["version"], st["last_result"]) == ("1.0.0", "skipped"), d.output
        assert "held back: rollout-replayed" in d.output and "held back: rollout-halted" in d.output, d.output
    finally:
        mirror.httpd.shutdown()
        mirror.httpd.server_close()


def test_a_lagging_mirror_first_does_not_cost_a_check(rollout_device, server, rollout_keys, tmp_path):
    # The same release on a mirror that still has yesterday's document and on the origin with
    # today's (both let the device in): the newer document's offer is taken, in this check.
    mirror_root = tmp_path / "mirror"
    shutil.copytree(server.root, mirror_root)
    mirror = Server(mirror_root)
    try:
        put_doc(mirror, rollout_keys[1], issued=T0)
        put_doc(server, rollout_keys[1], issued=T0 + 60)
        d = rollout_device(urls=mirror.url, mirrors=[server.url])
        d.run()
        assert d.status()["version"] == "2.0.0", d.output
        assert d.state()["rollout_seen"] == T0 + 60
    finally:
        mirror.httpd.shutdown()
        mirror.httpd.server_close()


def test_a_config_with_a_bad_role_is_bad_config(rollout_device, server, rollout_keys):
    d = rollout_device()
    cfg = json.loads(runner.fs_read(d.dev, "ota_config.json"))
    cfg["roles"]["rollout"]["threshold"] = 2
    runner.fs_write(d.dev, "ota_config.json", json.dumps(cfg).encode())
    d.run()
    st = d.status()
    assert st["last_error"] == "bad-config" and "threshold" in st["detail"], st


def test_a_held_release_is_reported_as_checked_with_its_code(rollout_device, server, rollout_keys):
    from fleet_receiver import FleetReceiver
    from mpota import fleetprov
    import secrets
    receiver = FleetReceiver(token="t").start()
    try:
        secret = secrets.token_hex(32)
        d = rollout_device(fleet=fleetprov.config_entry(receiver.url, secret, 3))
        receiver.register("dev", secret)
        put_doc(server, rollout_keys[1], share_bp=0)
        d.run()
        held(d, "not-in-rollout")
        reps = receiver.reports["dev"]
        assert [(r["event"], r["code"], r["target"]) for r in reps] == [("checked", "not-in-rollout", "2.0.0")], reps
        assert reps[0]["digest"] == envelope_digest(server)
        assert receiver.refused == {}
    finally:
        receiver.stop()
