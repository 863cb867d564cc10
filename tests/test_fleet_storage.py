"""Fleet storage, against SQLite and a real PostgreSQL (the fleet_db fixture): registration,
batches committed once, replays and duplicates, the inventory derived from reports (and equal to
deriving it from the whole history), failed-silent, filters, log imports, counters."""
from __future__ import annotations

import pytest

from fleet_util import batch, new_secret, rep, update_story
from mpota.fleet import inventory, views
from mpota.fleet.protocol import Refusal
from mpota.fleet.storage import Store


@pytest.fixture
def store(fleet_db):
    s = Store(fleet_db)
    yield s
    s.close()


def test_register_ingest_and_replay(store):
    sec = new_secret()
    assert store.register("dev1", sec, board="esp32", interval_s=60, now=1000.0) is True
    assert store.secret("dev1") == sec
    assert store.ingest(batch("dev1", [rep(1, "boot"), rep(2, "checked")]), sec, now=1001.0) == (2, 2, 0)
    # a resend after a lost ack: the known reports are duplicates, the new one is stored
    assert store.ingest(batch("dev1", [rep(2, "checked"), rep(3, "up-to-date")]), sec, now=1002.0) == (3, 1, 1)
    with pytest.raises(Refusal) as e:
        store.ingest(batch("dev1", [rep(1, "boot"), rep(3, "up-to-date")]), sec, now=1003.0)
    assert e.value.reason == "replay" and e.value.ack == 3 and e.value.duplicates == 2
    evs = store.events(device="dev1")
    assert [e["n"] for e in evs] == [3, 2, 1]  # newest first, each once
    d = store.device("dev1")
    assert d["last_n"] == 3 and d["reports"] == 3 and d["last_seen"] == 1002.0
    assert d["status"] == "ok" and d["last_result"] is None  # no update yet


def test_unknown_and_rotated_devices_are_refused(store):
    with pytest.raises(Refusal) as e:
        store.ingest(batch("ghost", [rep(1, "boot")]), new_secret())
    assert e.value.reason == "unknown-device"
    old, new = new_secret(), new_secret()
    store.register("dev1", old)
    assert store.register("dev1", new) is False  # a rotation
    with pytest.raises(Refusal) as e:
        store.ingest(batch("dev1", [rep(1, "boot")]), old)
    assert e.value.reason == "bad-signature"
    store.ingest(batch("dev1", [rep(1, "boot")]), new)
    assert store.unregister("dev1") is True
    with pytest.raises(Refusal) as e:
        store.ingest(batch("dev1", [rep(2, "boot")]), new)
    assert e.value.reason == "unknown-device"
    assert store.device("dev1")["reports"] == 1  # history kept
    assert store.unregister("dev1", forget=True) is True
    assert store.device("dev1") is None and store.events(device="dev1") == []


def test_inventory_follows_an_update_and_a_rollback(store):
    sec = new_secret()
    store.register("a", sec, interval_s=100, now=0.0)
    store.register("b", sec, interval_s=100, now=0.0)
    store.ingest(batch("a", update_story(1, "1.0.0", "2.0.0", "confirmed")), sec, now=10.0)
    store.ingest(batch("b", update_story(1, "1.0.0", "2.0.0", "installed")), sec, now=10.0)
    b = store.device("b")
    assert b["status"] == "pending-confirm" and b["pending"] == "2.0.0" and b["version"] == "1.0.0"
    # the image that came back reports the rollback, with no target: it is about the pending release
    store.ingest(batch("b", [rep(4, "rolled-back", version="1.0.0", code="health-failed", reset=3)]), sec, now=20.0)
    a, b = store.device("a"), store.device("b")
    assert (a["version"], a["slot"], a["status"], a["last_result"]) == ("2.0.0", "ota_1", "ok", "confirmed")
    assert (b["version"], b["status"], b["last_error"], b["pending"]) == ("1.0.0", "rolled-back", "health-failed", None)
    outcome = {x["device"]: x["outcome"] for x in store.attempts(release="2.0.0")}
    assert outcome == {"a": "confirmed", "b": "rolled-back"}


def test_silent_after_an_install_is_failed_silent(store):
    sec = new_secret()
    store.register("quiet", sec, interval_s=60, now=0.0)
    store.register("fine", sec, interval_s=60, now=0.0)
    store.ingest(batch("quiet", update_story(1, "1.0.0", "2.0.0", "installed")), sec, now=100.0)
    store.ingest(batch("fine", [rep(1, "up-to-date")]), sec, now=100.0)
    limit = 100.0 + inventory.silent_after(60)
    before = views.list_devices(store, {}, now=limit - 1)
    assert {d["id"]: d["status"] for d in before["devices"]} == {"quiet": "pending-confirm", "fine": "ok"}
    after = views.list_devices(store, {}, now=limit + 1)
    assert {d["id"]: d["status"] for d in after["devices"]} == {"quiet": "failed-silent", "fine": "ok"}
    assert [d["id"] for d in views.list_devices(store, {"status": "failed-silent"}, now=limit + 1)["devices"]] == ["quiet"]
    assert views.list_devices(store, {"status": "failed-silent"}, now=limit - 1)["count"] == 0
    assert {d["id"] for d in views.list_devices(store, {"silent": "1"}, now=limit + 1)["devices"]} == {"quiet", "fine"}
    [a] = store.attempts(device="quiet")
    assert inventory.attempt_outcome(a, store.device("quiet"), limit + 1) == "failed-silent"


def test_filters(store):
    sec = new_secret()
    for i, (board, chip, version) in enumerate([("esp32", "esp32", "1.0.0"), ("esp32s3", "esp32s3", "1.0.0"),
                                                ("esp32s3", "esp32s3", "2.0.0")]):
        store.register(f"d{i}", sec, now=0.0, cohort="canary" if i == 2 else None)
        store.ingest(batch(f"d{i}", [rep(1, "checked", board=board, chip=chip, version=version)]), sec,
                     now=100.0 * (i + 1))
    ids = lambda **f: [d["id"] for d in views.list_devices(store, f, now=400.0)["devices"]]  # noqa: E731
    assert ids(board="esp32s3") == ["d1", "d2"]
    assert ids(chip="esp32") == ["d0"]
    assert ids(version="1.0.0", board="esp32s3") == ["d1"]
    assert ids(cohort="canary") == ["d2"]
    assert ids(seen_before="200") == ["d0"]
    assert ids(silent_since="200") == ["d0"] and ids(silent_since="300", seen_before="200") == ["d0"]
    assert ids(seen_after="200") == ["d1", "d2"]
    assert ids(seen_after="1970-01-01T00:05:00Z") == ["d2"]
    assert ids(status="ok") == ["d0", "d1", "d2"]
    total, rows = store.devices(limit=2, offset=1)
    assert total == 3 and [r["id"] for r in rows] == ["d1", "d2"]


def test_incremental_inventory_equals_deriving_it_from_the_history(store):
    """What storage keeps up to date batch by batch is what the whole history says."""
    sec = new_secret()
    store.register("x", sec, interval_s=300, now=0.0)
    story = (update_story(1, "1.0.0", "2.0.0", "rolled-back") + update_story(5, "1.0.0", "2.1.0", "refused")
             + update_story(8, "1.0.0", "2.2.0", "confirmed", boots=4) + [rep(12, "boot", version="2.2.0", reset=3)])
    t = 0.0
    for i in range(0, len(story), 3):
        t += 10
        store.ingest(batch("x", story[i:i + 3]), sec, now=t)
    reg = inventory.new_device("x", sec, 0.0, interval_s=300)
    times = {e["n"]: e["received_at"] for e in store.events(device="x")}
    want, want_attempts = inventory.derive(reg, [(times[r["n"]], r) for r in story])
    got = store.device("x")
    for k in inventory.DEVICE_FIELDS:
        assert got[k] == want[k], k
    got_attempts = {a["release"]: a for a in store.attempts(device="x")}
    assert got_attempts.keys() == want_attempts.keys() == {"2.0.0", "2.1.0", "2.2.0"}
    for rel, a in want_attempts.items():
        assert {k: got_attempts[rel][k] for k in a} == a
    assert {r: a["outcome"] for r, a in got_attempts.items()} == {"2.0.0": "rolled-back", "2.1.0": "refused",
                                                                 "2.2.0": "confirmed"}


def test_log_announces_are_imported_once(store):
    store.register("dev1", new_secret(), now=0.0)
    line = '10.0.0.7 - - [01/Jun/2025:12:00:00 +0000] "GET /manifest.json?d=dev1&v=1.0.0&r=confirmed HTTP/1.1" 200 512'
    other = '10.0.0.8 - - [01/Jun/2025:12:00:05 +0000] "GET /manifest.json?d=newdev&v=0.9&r=rolled-back:health-failed HTTP/1.1" 200 512'
    items = [(1748779200.0, {"device": "dev1", "version": "1.0.0", "result": "confirmed"}, line),
             (1748779205.0, {"device": "newdev", "version": "0.9", "result": "rolled-back:health-failed",
                             "code": "health-failed"}, other)]
    assert store.import_announces(items, register_unknown=False) == {"imported": 1, "duplicates": 0, "unknown": 1,
                                                                      "devices": 1}
    again = store.import_announces(items)
    assert (again["imported"], again["duplicates"]) == (1, 1)
    d, n = store.device("dev1"), store.device("newdev")
    assert (d["version"], d["last_result"], d["source"], d["secret"] is not None) == ("1.0.0", "confirmed", "log", True)
    assert (n["version"], n["status"], n["last_error"], n["secret"]) == ("0.9", "rolled-back", "health-failed", None)
    assert [e["event"] for e in store.events(device="newdev")] == ["announce"]


def test_counters_add_up(store):
    store.add_counts({"refused:bad-signature": 2, "reports": 5})
    store.add_counts({"refused:bad-signature": 1})
    assert store.counts() == {"refused:bad-signature": 3, "reports": 5}
    assert views.stats(store)["refusals"] == {"bad-signature": 3}


def test_a_second_store_on_the_same_database_sees_the_same_fleet(fleet_db):
    """Two processes (here: two engines) on one database: the schema is made once, data shared."""
    a, b = Store(fleet_db), Store(fleet_db)
    try:
        sec = new_secret()
        a.register("d", sec)
        assert b.ingest(batch("d", [rep(1, "boot")]), sec)[0] == 1
        with pytest.raises(Refusal):
            a.ingest(batch("d", [rep(1, "boot")]), sec)
    finally:
        a.close()
        b.close()
