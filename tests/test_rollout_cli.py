"""`mpota rollout sign` / `show`: documents that rolloutdoc.open_document accepts, `issued` strictly
increasing across re-signs, the release key refused as a rollout key, bad input refused with a
hint (exit 2) and nothing written, and `show` of a directory or a URL (a real loopback server)
saying what one device would do, by rolloutdoc.decide's rules."""
from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest

from mpota import keys, release, rollout, rolloutdoc
from mpota.cli import main
from mpota.server import serve_in_thread


@pytest.fixture
def rel(tmp_path, firmware, signer):
    out = tmp_path / "rel"
    release.build(firmware("1.3.0"), out, [signer])
    return out


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def opened(rel, rollout_key) -> dict:
    return rolloutdoc.open_document((rel / "rollout.json").read_bytes(), [keys.load_public(f"{rollout_key}.pub")])


def test_sign_then_open_document_roundtrip(capsys, rel, rollout_key):
    rc, out, err = run(capsys, "rollout", "sign", rel, "--key", rollout_key, "--stages",
                       "1@2026-12-01T00:00Z,10@+1d,100@+3d", "--expires", "10d", "--groups", "canary,line-3",
                       "--boards", "esp32", "--exclude", "dev-4", "--window", "0 2 * * *", "--window-duration", "2h",
                       "--utc-offset", "+01:00", "--jitter", "15m", "--rollout-id", "r-test-1")
    assert rc == 0, err
    doc = opened(rel, rollout_key)
    assert doc["release"] == hashlib.sha256((rel / "manifest.json").read_bytes()).hexdigest()
    assert doc["version"] == "1.3.0" and doc["rollout"] == "r-test-1"
    assert [s["share_bp"] for s in doc["stages"]] == [100, 1000, 10000]
    assert doc["stages"][0]["at"] == 1796083200  # 2026-12-01T00:00Z
    assert doc["stages"][2]["at"] - doc["stages"][1]["at"] == 2 * 86400
    assert doc["expires"] - doc["issued"] == 10 * 86400
    assert doc["targets"] == {"boards": ["esp32"], "groups": ["canary", "line-3"]} and doc["exclude"] == ["dev-4"]
    assert doc["window"] == {"cron": "0 2 * * *", "duration_s": 7200, "utc_offset_min": 60, "jitter_s": 900}
    # progress, summary, verify
    assert "version 1.3.0" in out and "share now" in out and "expires" in out and '"0 2 * * *"' in out
    assert out.strip().splitlines()[-1].startswith("rollout: verified")
    assert not list(rel.glob(".*tmp"))


def test_issued_strictly_increasing_across_resigns(capsys, rel, rollout_key):
    seen = []
    for share in ("1", "10", "50"):
        rc, _, err = run(capsys, "rollout", "sign", rel, "--key", rollout_key, "--share", share)
        assert rc == 0, err
        seen.append(opened(rel, rollout_key)["issued"])
    assert seen[0] < seen[1] < seen[2]
    # a previous document ahead of this clock: the next one is one second after it, not now
    ahead = rollout.sign(rel, keys.load_private(rollout_key), now=seen[-1] + 3600, share="60")
    rc, out, err = run(capsys, "rollout", "sign", rel, "--key", rollout_key, "--share", "70")
    assert rc == 0, err
    assert opened(rel, rollout_key)["issued"] == ahead.doc["issued"] + 1
    assert "ahead of this clock" in out
    # the rollout id stays the same for the same release
    assert opened(rel, rollout_key)["rollout"] == ahead.doc["rollout"]


def test_release_key_refused_as_rollout_key(capsys, rel, keydir):
    rc, out, err = run(capsys, "rollout", "sign", rel, "--key", keydir / "release", "--share", "10")
    assert rc == 2
    assert "two keys" in err and "hint:" in err and "mpota keygen keys/rollout" in err
    assert not (rel / "rollout.json").exists()


@pytest.mark.parametrize("args,expect", [
    (["--stages", "1@tomorrow"], "not a time"),
    (["--stages", "150@now"], "0 to 100 percent"),
    (["--stages", "10@+2d,20@+1d"], "time order"),
    (["--stages", "1@2026-12-01T00:00"], "no time zone"),
    (["--share", "10", "--stages", "1@now"], "not both"),
    ([], "--share PERCENT or --stages"),
    (["--share", "10", "--window", "0 25 * * *", "--window-duration", "2h"], "outside 0-23"),
    (["--share", "10", "--window", "0 2 * *", "--window-duration", "2h"], "five fields"),
    (["--share", "10", "--window", "0 2 * * *"], "--window-duration"),
    (["--share", "10", "--window", "0 2 * * *", "--window-duration", "30s"], "duration_s"),
    (["--share", "10", "--jitter", "15m"], "go with --window"),
    (["--share", "10", "--expires", "2001-01-01T00:00Z"], "not after it is issued"),
    (["--share", "10", "--devices", "bad name!"], "names of"),
])
def test_bad_input_exit_2_with_a_hint(capsys, rel, rollout_key, args, expect):
    rc, out, err = run(capsys, "rollout", "sign", rel, "--key", rollout_key, *args)
    assert rc == 2 and expect in err, err
    assert "hint:" in err
    assert not (rel / "rollout.json").exists()


@pytest.mark.parametrize("opt,value", [("--valid-for", "7 days"), ("--utc-offset", "+25:00"), ("--jitter", "soon")])
def test_bad_option_text_is_refused_at_parse_time(capsys, rel, rollout_key, opt, value):
    with pytest.raises(SystemExit) as e:
        main(["rollout", "sign", str(rel), "--key", str(rollout_key), "--share", "10", opt, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert opt in err and "hint:" in err


def test_bad_key_and_missing_manifest(capsys, tmp_path, rel, rollout_key):
    for key, expect in ((f"{rollout_key}.pub", "public key"), (tmp_path / "nope", "cannot read"),
                        (rel / "manifest.json", "not an unencrypted PEM private key")):
        rc, _, err = run(capsys, "rollout", "sign", rel, "--key", key, "--share", "10")
        assert rc == 2 and expect in err, err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(capsys, "rollout", "sign", empty, "--key", rollout_key, "--share", "10")
    assert rc == 2 and "manifest" in err and "mpota release" in err
    assert not (empty / "rollout.json").exists()


def test_halt_and_show_a_device(capsys, rel, rollout_key):
    assert run(capsys, "rollout", "sign", rel, "--key", rollout_key, "--share", "100")[0] == 0
    rc, out, err = run(capsys, "rollout", "show", rel, "--pub", f"{rollout_key}.pub", "--device", "dev-17")
    assert rc == 0, err
    assert "verified" in out and "names the manifest.json beside it" in out and "dev-17: installs now" in out
    rc, out, err = run(capsys, "rollout", "sign", rel, "--key", rollout_key, "--halt", "boot loops on line 3")
    assert rc == 0 and "HALTED: boot loops on line 3" in out
    rc, out, _ = run(capsys, "rollout", "show", rel, "--pub", f"{rollout_key}.pub", "--device", "dev-17")
    assert "holds back: rollout-halted" in out


def test_show_agrees_with_decide_for_many_devices(capsys, rel, rollout_key):
    assert run(capsys, "rollout", "sign", rel, "--key", rollout_key, "--stages", "5@now,50@+1d",
               "--exclude", "dev-3")[0] == 0
    doc = opened(rel, rollout_key)
    digest = doc["release"]
    later = doc["issued"] + 86400 + 60
    for i in range(40):
        dev = f"dev-{i}"
        for at in (doc["issued"], later):
            sh = rollout.show(str(rel), [keys.load_public(f"{rollout_key}.pub")], now=at, device=dev)
            want = rolloutdoc.decide(doc, dev, board="esp32", release=digest, now=at, clock_known=True)
            assert sh.device["decision"] == want
            assert sh.device["bucket"] == rolloutdoc.bucket(dev, digest)
            assert sh.device["in_share"] == (sh.device["bucket_share_bp"] < sh.share_bp_now)
    assert rollout.show(str(rel), now=doc["issued"], device="dev-3").device["decision"] == "not-in-rollout"


def test_show_a_url_from_a_real_server(capsys, rel, rollout_key, keydir):
    assert run(capsys, "rollout", "sign", rel, "--key", rollout_key, "--share", "10", "--window", "0 2 * * *",
               "--window-duration", "2h")[0] == 0
    httpd, url = serve_in_thread(rel)
    try:
        rc, out, err = run(capsys, "rollout", "show", url, "--pub", f"{rollout_key}.pub", "--json",
                           "--device", "dev-1", "--at", "2026-12-02T02:30Z")
        assert rc == 0, err
        j = json.loads(out)
        assert j["verified"] and j["release_matches"] and j["share_bp_now"] == 1000
        assert j["document"] == opened(rel, rollout_key)
        assert j["device"]["id"] == "dev-1" and j["device"]["decision"] in (None, "not-in-rollout")
        # the wrong key: refused, exit 2
        rc, out, err = run(capsys, "rollout", "show", url + "rollout.json", "--pub", keydir / "release.pub")
        assert rc == 2 and "no signature by a trusted key" in err
        # without a key: shown, said to be unchecked
        rc, out, err = run(capsys, "rollout", "show", url)
        assert rc == 0 and "NOT checked" in out
        # a release directory without rollout.json
        (rel / "rollout.json").unlink()
        rc, out, err = run(capsys, "rollout", "show", url)
        assert rc == 2 and "404" in err and "mpota rollout sign" in err
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("text,want", [("+1d", 1000 + 86400), ("now", 1000), ("2026-12-01", 1796083200),
                                       ("2026-12-01T02:00+01:00", 1796083200 + 3600), ("1796083200", 1796083200)])
def test_parse_time(text, want):
    assert rollout.parse_time(text, 1000) == want


def test_parse_stages_and_share():
    assert rollout.parse_stages("0.5@now,10@+1h,100@+1d", 100) == [
        {"at": 100, "share_bp": 50}, {"at": 3700, "share_bp": 1000}, {"at": 86500, "share_bp": 10000}]
    assert rollout.parse_stages("25", 100) == [{"at": 100, "share_bp": 2500}]
    assert rollout.parse_share("10%") == 1000
    with pytest.raises(ValueError):
        rollout.parse_share("0.001")
    with pytest.raises(rollout.RolloutSignError):
        rollout.parse_stages("10@+1d,100", 100)  # 100 % now, before the 10 % stage


# ---- issued: only from a verified previous document, never pushed far ahead ------------------

def test_issued_is_taken_only_from_a_document_this_key_signed(capsys, rel, rollout_key, keydir):
    now = 1_900_000_000
    key = keys.load_private(rollout_key)
    # an unsigned file (anyone who can write the directory) with issued near 2**40
    body = {"schema": 1, "issued": 2 ** 40 - 10}
    (rel / "rollout.json").write_text(json.dumps({"payloadType": rolloutdoc.PAYLOAD_TYPE, "signatures": [],
                                                  "payload": base64.b64encode(json.dumps(body).encode()).decode()}))
    s = rollout.sign(rel, key, now=now, share="10")
    assert s.doc["issued"] == now and s.previous_issued is None
    assert any("does not verify" in n and "ignored" in n for n in s.notes)
    # a document signed by another key is ignored too (printed as a warning by the CLI)
    doc = dict(s.doc, issued=now + 10 ** 8, expires=now + 10 ** 8 + 60)
    (rel / "rollout.json").write_bytes(rolloutdoc.sign(doc, keys.load_private(keydir / "foreign")))
    rc, out, err = run(capsys, "rollout", "sign", rel, "--key", rollout_key, "--share", "10")
    assert rc == 0, err
    assert "warning:" in out and "does not verify" in out
    assert abs(opened(rel, rollout_key)["issued"] - time.time()) < 60


def test_issued_far_ahead_is_refused_but_a_halt_is_signed(capsys, rel, rollout_key):
    now = 1_900_000_000
    key = keys.load_private(rollout_key)
    rollout.sign(rel, key, now=now + 3 * 86400, share="10")  # a clock that once jumped 3 days ahead
    before = (rel / "rollout.json").read_bytes()
    with pytest.raises(rollout.RolloutSignError) as e:
        rollout.sign(rel, key, now=now, share="50")
    assert e.value.code == "issued-ahead" and "clock" in e.value.hint
    assert (rel / "rollout.json").read_bytes() == before
    s = rollout.sign(rel, key, now=now, halted="boot loops")
    assert s.doc["issued"] == now + 3 * 86400 + 1 and s.doc["halted"] == "boot loops"
    assert any(n.startswith("warning:") and "halt" in n for n in s.notes)
    # within a day ahead: signed as before, one second after the previous
    rel2 = rel.parent / "rel2"
    rel2.mkdir()
    for f in rel.iterdir():
        if f.name != "rollout.json":
            (rel2 / f.name).write_bytes(f.read_bytes())
    rollout.sign(rel2, key, now=now + 3600, share="10")
    assert rollout.sign(rel2, key, now=now, share="20").doc["issued"] == now + 3601
    # a halt stays signable even with the previous document near the end of time
    rollout.sign(rel2, key, now=2 ** 40 - 1000, share="10", valid_for=60)
    s = rollout.sign(rel2, key, now=now, halted="pulled")
    assert s.doc["issued"] == 2 ** 40 - 999 and s.doc["expires"] == rolloutdoc.ISSUED_MAX
    assert opened(rel2, rollout_key)["halted"] == "pulled"
