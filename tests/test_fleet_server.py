"""The fleet server over real HTTP (uvicorn on loopback), against SQLite and PostgreSQL: reports
acknowledged, hostile requests (wrong MACs, replays, huge and fuzzed bodies, broken HTTP, slow
clients) refused with their status code and counted while the server keeps serving; the admin
API and its token; the dashboard's sign-in."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_util import new_secret, rep, seed_fleet, update_story
from mpota.fleet import protocol
from mpota.fleet.client import Admin, Reporter, raw_request
from mpota.fleet.server import start_in_thread


@pytest.fixture
def srv(fleet_db):
    s = start_in_thread(fleet_db, body_timeout=1.0)
    yield s
    s.stop()


def _register(srv, device="dev1", **kw):
    sec = new_secret()
    Admin(srv.url, srv.token).register(device, sec, **kw)
    return Reporter(srv.url, device, bytes.fromhex(sec))


def _stats(srv):
    return Admin(srv.url, srv.token).stats()


def test_reports_are_acknowledged_and_make_the_inventory(srv):
    r = _register(srv, board="esp32", interval_s=600)
    for x in update_story(1, "1.0.0", "2.0.0", "confirmed"):
        r.report(x.pop("event"), **{k: v for k, v in x.items() if k != "n"})
    assert r.flush() and r.acked == 4 and r.queue == []
    d = Admin(srv.url, srv.token).device("dev1")
    assert (d["device"]["version"], d["device"]["status"], d["device"]["slot"]) == ("2.0.0", "ok", "ota_1")
    assert [e["event"] for e in d["events"]] == ["confirmed", "installed", "downloading", "checked"]
    assert "secret" not in d["device"]
    assert _stats(srv)["reports"] == 4


def test_a_batch_is_cut_to_16_reports_and_4096_bytes(srv):
    r = _register(srv)
    for _ in range(40):
        r.report("checked", version="1.0.0", detail="d" * 150)
    bodies = []
    post = r.post
    r.post = lambda body, signature=None: (bodies.append(body), post(body, signature))[1]
    assert r.flush() and r.acked == 40
    assert all(len(b) <= protocol.MAX_BODY and len(json.loads(b)["reports"]) <= 16 for b in bodies)


def test_hostile_requests_are_refused_and_counted_and_the_server_keeps_serving(srv):
    r = _register(srv)
    good = protocol.encode_batch("dev1", [rep(1, "boot")])
    assert r.post(good, signature="00" * 32) == (401, {"error": "bad-signature"})
    assert r.post(good, signature="") == (401, {"error": "bad-signature"})
    tampered = good.replace(b'"boot"', b'"checked"')  # any change to the body: the MAC no longer matches
    assert r.post(tampered, signature=protocol.sign(r.secret, good)) == (401, {"error": "bad-signature"})
    assert r.post(good) == (200, {"ack": 1})
    assert r.post(good) == (409, {"error": "replay", "ack": 1})
    other = Reporter(srv.url, "ghost", bytes(32))
    assert other.post(protocol.encode_batch("ghost", [rep(1, "boot")])) == (404, {"error": "unknown-device"})
    status, doc = r.post(b'{"device": "dev1", "reports": [{"n": 2}]}')
    assert status == 400 and doc["error"] == "bad-report" and "missing" in doc["detail"]
    status, doc = r.post(b"x" * (protocol.MAX_BODY + 1))
    assert (status, doc) == (413, {"error": "too-large"})
    # a declared huge body is refused before it is read: send only the headers
    head = (f"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\nX-Mpota-Device: dev1\r\n"
            f"X-Mpota-Signature: {'0' * 64}\r\n\r\n").encode()
    assert raw_request(srv.url, head).startswith(b"HTTP/1.1 413")
    # chunked, with no Content-Length: counted while it streams in
    chunked = (b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Mpota-Device: dev1\r\n\r\n"
               + b"".join(b"1000\r\n" + b"a" * 4096 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n")
    assert raw_request(srv.url, chunked).startswith(b"HTTP/1.1 413")
    for junk in (b"\x00\x01\x02garbage\r\n\r\n", b"GET /v1/reports HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                 b"POST /v1/reports HTTP/1.1\r\nContent-Length: -5\r\n\r\n", b"POST /v1/reports HTTP/9.9\r\n\r\n"):
        try:
            raw_request(srv.url, junk, timeout=1)
        except OSError:
            pass
    assert r.post(protocol.encode_batch("dev1", [rep(2, "checked")])) == (200, {"ack": 2})
    refusals = _stats(srv)["refusals"]
    for reason, at_least in (("bad-signature", 3), ("replay", 1), ("unknown-device", 1), ("bad-report", 1),
                             ("too-large", 3), ("bad-method", 1)):
        assert refusals.get(reason, 0) >= at_least, (reason, refusals)
    assert _stats(srv)["duplicates"] == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=400),
                      st.dictionaries(st.sampled_from(protocol.FIELDS), st.none() | st.integers() | st.text(max_size=8),
                                      max_size=15).map(lambda d: json.dumps({"device": "fz", "reports": [
                                          {**rep(1, "boot"), **d}]}).encode())))
def test_fuzzed_bodies_with_a_valid_mac_are_stored_or_refused(srv_fuzz, body):
    r, seen = srv_fuzz
    status, doc = r.post(body)
    assert status in (200, 400, 409, 413), (status, doc)
    if status != 200:
        assert doc["error"] in ("bad-report", "replay", "too-large")
    seen[status] = seen.get(status, 0) + 1


@pytest.fixture(scope="module")
def srv_fuzz(tmp_path_factory):
    s = start_in_thread(str(tmp_path_factory.mktemp("fz") / "fleet.sqlite"))
    sec = new_secret()
    Admin(s.url, s.token).register("fz", sec)
    seen = {}
    yield Reporter(s.url, "fz", bytes.fromhex(sec)), seen
    # afterwards: still serving, and every refusal counted
    r = Reporter(s.url, "fz", bytes.fromhex(sec))
    assert r.post(protocol.encode_batch("fz", [rep(10 ** 12, "boot")]))[0] == 200
    stats = Admin(s.url, s.token).stats()
    assert stats["refusals"].get("bad-report", 0) == seen.get(400, 0)
    s.stop()


def test_slow_clients_get_408_and_do_not_hold_up_others(srv):
    r = _register(srv)
    slow = []
    for _ in range(8):  # headers and half a body, then nothing
        s = socket.create_connection((srv.url.split("//")[1].split(":")[0], int(srv.url.rsplit(":", 1)[1])))
        s.sendall(b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\nX-Mpota-Device: dev1\r\n\r\n"
                  + b"{" * 50)
        slow.append(s)
    assert r.post(protocol.encode_batch("dev1", [rep(1, "boot")])) == (200, {"ack": 1})
    for s in slow:
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 408")
        s.close()
    assert _stats(srv)["refusals"]["slow-client"] == 8
    assert r.post(protocol.encode_batch("dev1", [rep(2, "boot")])) == (200, {"ack": 2})


def _get(url, headers=None, method="GET", data=None):
    req = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def test_admin_api_needs_the_token(srv):
    for path in ("/v1/admin/devices", "/v1/admin/events", "/v1/admin/releases", "/v1/admin/anomalies",
                 "/v1/admin/devices/x", "/v1/admin/stats"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {srv.token}"}):
            status, body, h = _get(srv.url + path, headers)
            assert status == 401 and json.loads(body)["error"] == "unauthorized", path
            assert h["WWW-Authenticate"].startswith("Bearer")
    status, _, _ = _get(srv.url + "/v1/admin/devices/x", {}, "PUT", b'{"secret": "' + b"a" * 64 + b'"}')
    assert status == 401
    assert _get(srv.url + "/healthz")[0] == 200


def test_admin_register_validates(srv):
    adm = Admin(srv.url, srv.token)
    auth = {"Authorization": f"Bearer {srv.token}", "Content-Type": "application/json"}
    for body in (b"{", b"[]", b'{"secret": "abc"}', b'{"secret": "' + b"a" * 64 + b'", "interval_s": 0}',
                 b'{"secret": "' + b"a" * 64 + b'", "colour": "red"}'):
        status, out, _ = _get(srv.url + "/v1/admin/devices/d1", auth, "PUT", body)
        assert status == 400 and json.loads(out)["error"] == "bad-request", body
    assert _get(srv.url + "/v1/admin/devices/bad%20id", auth, "PUT", b'{"secret": "' + b"a" * 64 + b'"}')[0] == 400
    assert adm.register("d1", "a" * 64, board="esp32", interval_s=60, cohort="canary") == {"device": "d1", "created": True}
    assert adm.register("d1", "b" * 64) == {"device": "d1", "created": False}
    d = adm.device("d1")["device"]
    assert (d["board"], d["interval_s"], d["cohort"], d["registered"], d["status"]) == ("esp32", 60, "canary", True, "unseen")
    assert adm.unregister("d1") == {"device": "d1", "deleted": True, "forgotten": False}
    assert adm.unregister("nope").get("error") == "unknown-device"
    assert adm.device("nope") is None


def test_admin_queries_and_statistics(srv):
    now = time.time()
    seed_fleet(srv.app.state.fleet.store, now)
    adm = Admin(srv.url, srv.token)
    everything = adm.devices()
    assert everything["count"] == 48
    s3 = adm.devices(board="esp32s3", version="1.1.0")
    assert {d["id"] for d in s3["devices"]} == {f"esp32s3-{i:02d}" for i in range(0, 24, 3)}
    assert {d["status"] for d in s3["devices"]} == {"rolled-back"}
    assert [d["id"] for d in adm.devices(status="failed-silent")["devices"]] == ["esp32-05"]
    assert [d["id"] for d in adm.devices(silent=1)["devices"]] == ["esp32-05"]
    assert adm.devices(seen_after=now - 3600)["count"] == 47
    assert adm.devices(chip="esp32s3", status="ok")["count"] == 16
    ev = adm.events(event="rolled-back", limit=3)["events"]
    assert len(ev) == 3 and all(e["code"] == "health-failed" for e in ev)
    rel = adm.releases()
    r12 = next(r for r in rel["releases"] if r["release"] == "1.2.0")
    assert (r12["rolled_back"], r12["failed_silent"], r12["refused"]) == (8, 1, 1)
    assert {(g["board"], g["cohort"]) for g in r12["groups"]} == {("esp32", "canary"), ("esp32", "general"),
                                                                 ("esp32s3", "canary"), ("esp32s3", "general")}
    [t] = [t for t in rel["regressions"] if t["board"] == "esp32s3"]
    assert t["release"] == "1.2.0" and t["previous"] == "1.1.0" and t["alarm"] is True
    kinds = {(a["kind"], a.get("device") or a.get("release")) for a in adm.anomalies()["anomalies"]}
    assert {("regression", "1.2.0"), ("failed-silent", "esp32-05"), ("boot-loop", "esp32s3-01"),
            ("outlier", "esp32-11")} <= kinds
    bad = _get(srv.url + "/v1/admin/devices?status=weird", {"Authorization": f"Bearer {srv.token}"})
    assert bad[0] == 400 and b"unknown status" in bad[1]
    assert _get(srv.url + "/v1/admin/devices?limit=x", {"Authorization": f"Bearer {srv.token}"})[0] == 400


def test_dashboard_sign_in(srv):
    status, body, _ = _get(srv.url + "/")
    assert status == 401 and b'name="token"' in body
    assert _get(srv.url + "/?token=wrong")[0] == 401
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with opener.open(srv.url + f"/?token={srv.token}") as resp:  # 303 to / with the cookie
        assert resp.status == 200 and resp.url == srv.url + "/" and b"Fleet by version and board" in resp.read()
    with opener.open(srv.url + "/v1/admin/devices") as resp:  # the cookie reads the JSON beside the pages
        assert json.loads(resp.read())["count"] == 0
    req = urllib.request.Request(srv.url + "/v1/admin/devices/x", method="PUT", data=b'{"secret": "' + b"a" * 64 + b'"}')
    with pytest.raises(urllib.error.HTTPError) as e:  # but changes need the bearer token
        opener.open(req)
    assert e.value.code == 401
    form = urllib.parse.urlencode({"token": srv.token}).encode()
    opener2 = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    with opener2.open(urllib.request.Request(srv.url + "/login", data=form)) as resp:
        assert resp.status == 200 and b"Fleet by version and board" in resp.read()
