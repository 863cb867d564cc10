"""`mpota fleet ...` as a user runs it: serve (first line: the address), register offline (--db)
and through the admin API (--server), devices / device / events / releases / anomalies with and
without --json, import-logs, unregister; errors say what and how to fix it."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from fleet_util import seed_fleet
from mpota.fleet.client import Reporter
from mpota.fleet.server import Child
from mpota.fleet.storage import Store


def mpota(*args, cwd=None, ok=True):
    r = subprocess.run([sys.executable, "-m", "mpota", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr + r.stdout
    return r


def test_help_lists_the_verbs():
    out = mpota("fleet", "--help").stdout
    for verb in ("serve", "register", "unregister", "devices", "device", "events", "import-logs"):
        assert verb in out
    for verb in ("serve", "register", "devices", "device", "events", "import-logs", "releases", "anomalies"):
        assert "usage: mpota fleet" in mpota("fleet", verb, "--help").stdout


def test_offline_register_then_serve_then_the_admin_api(fleet_db, tmp_path):
    sec = tmp_path / "dev1.secret"
    r = mpota("fleet", "register", "dev1", "--secret-file", sec, "--generate", "--db", fleet_db, "--board", "esp32",
              "--interval", "60")
    assert "registered dev1" in r.stdout and sec.stat().st_mode & 0o777 == 0o600
    assert sec.read_text().strip() not in r.stdout + r.stderr  # the secret is never printed
    token = tmp_path / "admin.token"
    with Child(fleet_db, token) as srv:
        rep = Reporter(srv.url, "dev1", bytes.fromhex(sec.read_text().strip()))
        rep.report("installed", version="1.0.0", target="2.0.0", board="esp32", chip="esp32", slot="ota_0")
        rep.report("confirmed", version="2.0.0", board="esp32", chip="esp32", slot="ota_1")
        assert rep.flush()
        # register a second device through the server's admin API
        sec2 = tmp_path / "dev2.secret"
        mpota("fleet", "register", "dev2", "--secret-file", sec2, "--generate", "--server", srv.url,
              "--token-file", token, "--cohort", "canary")
        srv_args = ("--server", srv.url, "--token-file", token)
        doc = json.loads(mpota("fleet", "devices", "--json", *srv_args).stdout)
        assert doc["count"] == 2 and {d["id"]: d["status"] for d in doc["devices"]} == {"dev1": "ok", "dev2": "unseen"}
        assert json.loads(mpota("fleet", "devices", "--json", "--cohort", "canary", *srv_args).stdout)["count"] == 1
        table = mpota("fleet", "devices", *srv_args).stdout
        assert table.startswith("DEVICE") and "dev1" in table and "2.0.0" in table
        one = json.loads(mpota("fleet", "device", "dev1", "--json", *srv_args).stdout)
        assert one["device"]["version"] == "2.0.0" and [a["outcome"] for a in one["attempts"]] == ["confirmed"]
        assert "release 2.0.0: confirmed" in mpota("fleet", "device", "dev1", *srv_args).stdout
        evs = json.loads(mpota("fleet", "events", "--device", "dev1", "--json", *srv_args).stdout)["events"]
        assert [e["event"] for e in evs] == ["confirmed", "installed"]
        assert json.loads(mpota("fleet", "releases", "--json", *srv_args).stdout)["releases"][0]["release"] == "2.0.0"
        assert json.loads(mpota("fleet", "anomalies", "--json", *srv_args).stdout)["anomalies"] == []
        # the same answers straight from the database
        doc_db = json.loads(mpota("fleet", "devices", "--json", "--db", fleet_db).stdout)
        assert [d["id"] for d in doc_db["devices"]] == ["dev1", "dev2"]
        bad = mpota("fleet", "devices", "--server", srv.url, "--token-file", sec, ok=False)
        assert bad.returncode == 2 and "refused the admin token" in bad.stderr and "hint:" in bad.stderr
        mpota("fleet", "unregister", "dev2", *srv_args)
        assert rep.post(b"{}")[0] == 400  # dev1 still reports
    assert "unregistered" in mpota("fleet", "unregister", "dev1", "--db", fleet_db).stdout
    gone = mpota("fleet", "unregister", "nobody", "--db", fleet_db, ok=False)
    assert gone.returncode == 2 and "no device nobody" in gone.stderr


def test_errors_say_how_to_fix_them(tmp_path):
    r = mpota("fleet", "devices", cwd=tmp_path, ok=False)
    assert r.returncode == 2 and "which fleet?" in r.stderr and "hint:" in r.stderr
    r = mpota("fleet", "devices", "--db", tmp_path / "none.sqlite", ok=False)
    assert r.returncode == 2 and "no fleet database" in r.stderr
    (tmp_path / "s").write_text("not hex\n")
    r = mpota("fleet", "register", "d", "--secret-file", tmp_path / "s", "--db", tmp_path / "f.sqlite", ok=False)
    assert r.returncode == 2 and "64 hex digits" in r.stderr and "--generate" in r.stderr
    r = mpota("fleet", "register", "bad id", "--secret-file", tmp_path / "s", ok=False)
    assert r.returncode == 2 and "device id" in r.stderr
    r = mpota("fleet", "serve", "--db", "postgresql://u@127.0.0.1:1/x", ok=False)
    assert r.returncode == 2 and "--token-file" in r.stderr
    r = mpota("fleet", "serve", "--db", "mysql://x/y", "--token-file", tmp_path / "t", ok=False)
    assert r.returncode == 2 and "not a database" in r.stderr
    r = mpota("fleet", "devices", "--server", "http://127.0.0.1:9", "--token-file", tmp_path / "t", ok=False)
    assert r.returncode == 2 and "no admin token file" in r.stderr
    (tmp_path / "t").write_text("x" * 32)
    r = mpota("fleet", "devices", "--server", "http://127.0.0.1:9", "--token-file", tmp_path / "t", ok=False)
    assert r.returncode == 2 and "cannot reach" in r.stderr
    r = mpota("fleet", "devices", "--db", tmp_path / "f.sqlite", "--seen-after", "yesterday", ok=False)
    assert r.returncode == 2 and "not a time" in r.stderr


def test_import_logs(fleet_db, tmp_path):
    Store(fleet_db).close()
    log = tmp_path / "access.log"
    log.write_text(
        '192.0.2.1 - - [01/Jun/2025:12:00:00 +0000] "GET /manifest.json?d=dev1&v=1.0.0&r=confirmed HTTP/1.1" 200 712\n'
        '192.0.2.2 - - [01/Jun/2025:12:05:00 +0000] "GET /manifest.json HTTP/1.1" 200 712 "-" '
        '"mpota/0.1.0 (d=dev2; v=2.0.0; r=rolled-back:health-failed)"\n'
        '192.0.2.3 - - [01/Jun/2025:12:06:00 +0000] "GET /favicon.ico HTTP/1.1" 404 0 "-" "Mozilla/5.0"\n')
    out = json.loads(mpota("fleet", "import-logs", log, "--db", fleet_db, "--json").stdout)
    assert (out["lines"], out["imported"], out["devices"], out["skipped"]) == (3, 2, 2, {"no device named": 1})
    again = mpota("fleet", "import-logs", log, "--db", fleet_db).stdout
    assert "0 imported" in again and "2 already imported" in again
    doc = json.loads(mpota("fleet", "devices", "--db", fleet_db, "--json").stdout)
    got = {d["id"]: (d["version"], d["status"], d["last_error"], d["registered"], d["source"]) for d in doc["devices"]}
    assert got == {"dev1": ("1.0.0", "ok", None, False, "log"),
                   "dev2": ("2.0.0", "rolled-back", "health-failed", False, "log")}


def test_releases_and_anomalies_in_words(tmp_path):
    db = str(tmp_path / "f.sqlite")
    store = Store(db)
    seed_fleet(store, time.time())
    store.close()
    out = mpota("fleet", "releases", "--db", db).stdout
    assert "1.2.0" in out and "ALARM: 1.2.0 on esp32s3" in out and "Fisher" in out
    out = mpota("fleet", "anomalies", "--db", db).stdout
    for word in ("regression", "boot-loop", "outlier", "failed-silent"):
        assert word in out


@pytest.mark.parametrize("verb", ["devices", "events", "releases", "anomalies"])
def test_json_is_one_document(tmp_path, verb):
    db = str(tmp_path / "f.sqlite")
    Store(db).close()
    json.loads(mpota("fleet", verb, "--db", db, "--json").stdout)
