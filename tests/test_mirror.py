"""`mpota mirror sync`: a release and its rollout.json copied from a real loopback server, checked,
published in a safe order; a second sync downloads nothing; what a hostile upstream offers (a
tampered payload, a manifest signed by another key, a replayed rollout.json, a payload larger
than signed, endless bytes) is refused and the mirror's last good copy stays as it was; `--every`
survives an outage; `mpota serve` serves the mirror, rollout.json included."""
from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from faultserver import Fault, FaultServer

from mpota import dsse, fetch, keys, mirror, release, rollout, rolloutdoc, server as srv
from mpota.server import serve_in_thread

MPOTA = str(Path(sys.executable).parent / "mpota")


@pytest.fixture
def upstream(tmp_path, firmware, signer, rollout_key):
    """A release with a rollout document, served by the steerable server (it records requests)."""
    root = tmp_path / "upstream"
    release.build(firmware("1.3.0"), root, [signer])
    rollout.sign(root, keys.load_private(rollout_key), share="10")
    fs = FaultServer(root).start()
    yield fs
    fs.stop()


@pytest.fixture
def pubs(keydir, rollout_key):
    return [keys.load_public(keydir / "release.pub")], [keys.load_public(f"{rollout_key}.pub")]


def snapshot(d: Path) -> dict:
    """The files a mirror serves (its lock and state files aside)."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in (mirror.LOCK_NAME, mirror.STATE_NAME)}


def test_sync_copies_release_and_rollout_and_serve_serves_it(tmp_path, upstream, pubs, rollout_key):
    dest = tmp_path / "mirror"
    res = mirror.sync(upstream.url, dest, *pubs)
    assert res.version == "1.3.0" and res.bytes == (upstream.root / "fw-1.3.0-healthy-esp32-0-65536.bin").stat().st_size
    assert snapshot(dest) == snapshot(upstream.root)
    assert res.downloaded == ["fw-1.3.0-healthy-esp32-0-65536.bin", "manifest.json", "rollout.json"]
    assert oct((dest / "manifest.json").stat().st_mode & 0o777) == "0o644"
    release.verify(dest, pubs[0])
    srv.check_release_dir(dest)  # `mpota serve` accepts the mirror
    httpd, url = serve_in_thread(dest)
    try:
        host, port = httpd.server_address[:2]
        for name in ("manifest.json", "rollout.json", res.payload):
            c = http.client.HTTPConnection(host, port, timeout=5)
            c.request("GET", "/" + name)
            r = c.getresponse()
            assert r.status == 200 and r.read() == (dest / name).read_bytes()
            c.close()
        # what a device would see through the mirror: the document verifies and names the release
        sh = rollout.show(url, pubs[1], device="dev-1")
        assert sh.verified and sh.release_matches
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_second_sync_downloads_nothing(tmp_path, upstream, pubs):
    dest = tmp_path / "mirror"
    mirror.sync(upstream.url, dest, *pubs)
    mtimes = {p: p.stat().st_mtime_ns for p in dest.iterdir() if p.name != mirror.LOCK_NAME}
    assert (dest / mirror.STATE_NAME) in mtimes  # the state file is not rewritten either
    upstream.requests.clear()
    res = mirror.sync(upstream.url, dest, *pubs)
    assert not res.changed and res.bytes == 0 and "up to date" in mirror.describe(res)
    assert sorted(r.path for r in upstream.requests) == ["/manifest.json", "/rollout.json"]
    assert {p: p.stat().st_mtime_ns for p in dest.iterdir() if p.name != mirror.LOCK_NAME} == mtimes


def test_new_release_replaces_the_old_payload_after_the_manifest(tmp_path, upstream, pubs, firmware, signer,
                                                                 rollout_key):
    dest = tmp_path / "mirror"
    first = mirror.sync(upstream.url, dest, *pubs)
    old_payload = upstream.root / first.payload
    release.build(firmware("1.4.0"), upstream.root, [signer])
    old_payload.unlink()
    rollout.sign(upstream.root, keys.load_private(rollout_key), share="1")
    res = mirror.sync(upstream.url, dest, *pubs)
    assert res.version == "1.4.0" and res.removed == [first.payload]
    assert res.downloaded[0] == res.payload  # the payload is published before the manifest that names it
    assert snapshot(dest) == snapshot(upstream.root)
    # the upstream goes back to 1.3.0: refused as a possible replay (devices would refuse the
    # downgrade anyway: following would only lose the good copy), unless --allow-older
    before = snapshot(dest)
    release.build(firmware("1.3.0"), upstream.root, [signer])
    with pytest.raises(mirror.MirrorError) as e:
        mirror.sync(upstream.url, dest, *pubs)
    assert e.value.code == "release-older" and "1.4.0" in str(e.value) and "--allow-older" in e.value.hint
    assert snapshot(dest) == before and not list(dest.rglob("*.part"))
    # even after the mirror's manifest.json is gone (the mark is in the state file)
    (dest / "manifest.json").unlink()
    with pytest.raises(mirror.MirrorError) as e:
        mirror.sync(upstream.url, dest, *pubs)
    assert e.value.code == "release-older"
    res = mirror.sync(upstream.url, dest, *pubs, allow_older=True)
    assert res.version == "1.3.0" and any("older than the 1.4.0" in n for n in res.notes)
    assert mirror.sync(upstream.url, dest, *pubs).version == "1.3.0"  # followed on purpose: the mark moved back


def test_rollout_for_another_release_is_mirrored_with_a_note(tmp_path, upstream, pubs, firmware, signer):
    dest = tmp_path / "mirror"
    release.build(firmware("1.4.0"), upstream.root, [signer])  # rollout.json still names 1.3.0
    res = mirror.sync(upstream.url, dest, *pubs)
    assert any("rollout-other-release" in n for n in res.notes)
    assert (dest / "rollout.json").read_bytes() == (upstream.root / "rollout.json").read_bytes()


def refused(tmp_path, upstream, pubs, code, change):
    """Sync, change the upstream with `change`, sync again: refused with `code`, mirror untouched."""
    dest = tmp_path / "mirror"
    mirror.sync(upstream.url, dest, *pubs)
    before = snapshot(dest)
    change(upstream.root)
    with pytest.raises(mirror.MirrorError) as e:
        mirror.sync(upstream.url, dest, *pubs)
    assert e.value.code == code, str(e.value)
    assert snapshot(dest) == before
    assert not list(dest.rglob("*.part"))
    return e.value


def test_tampered_payload_is_refused(tmp_path, upstream, pubs, firmware, signer):
    def change(root):
        release.build(firmware("1.4.0"), root, [signer])
        p = root / "fw-1.4.0-healthy-esp32-0-65536.bin"
        data = bytearray(p.read_bytes())
        data[5000] ^= 1
        p.write_bytes(bytes(data))
    e = refused(tmp_path, upstream, pubs, "hash-mismatch", change)
    assert e.hint


def test_manifest_signed_by_another_key_is_refused(tmp_path, upstream, pubs, firmware, keydir):
    foreign = keys.load_private(keydir / "foreign")
    e = refused(tmp_path, upstream, pubs, "unknown-key",
                lambda root: release.build(firmware("1.4.0"), root, [foreign]))
    assert "release key" in e.hint


def test_replayed_rollout_is_refused(tmp_path, upstream, pubs, rollout_key):
    old = (upstream.root / "rollout.json").read_bytes()
    dest = tmp_path / "mirror"
    rollout.sign(upstream.root, keys.load_private(rollout_key), halted="boot loops")  # newer: a halt
    mirror.sync(upstream.url, dest, *pubs)
    assert rolloutdoc.open_document((dest / "rollout.json").read_bytes(), pubs[1])["halted"] == "boot loops"
    e = refused(tmp_path, upstream, pubs, "rollout-replayed",
                lambda root: (root / "rollout.json").write_bytes(old))
    assert "issued" in str(e)


def test_replay_after_a_404_is_refused(tmp_path, upstream, pubs, rollout_key):
    """An attacker on the upstream link answers 404 for rollout.json once (the mirror drops its
    copy), then serves the signed pre-halt document: the high-water mark refuses it."""
    old = (upstream.root / "rollout.json").read_bytes()
    dest = tmp_path / "mirror"
    rollout.sign(upstream.root, keys.load_private(rollout_key), halted="boot loops")
    halt = (upstream.root / "rollout.json").read_bytes()
    mirror.sync(upstream.url, dest, *pubs)
    (upstream.root / "rollout.json").unlink()
    res = mirror.sync(upstream.url, dest, *pubs)
    assert res.removed == ["rollout.json"] and not (dest / "rollout.json").exists()
    (upstream.root / "rollout.json").write_bytes(old)
    with pytest.raises(mirror.MirrorError) as e:
        mirror.sync(upstream.url, dest, *pubs)
    assert e.value.code == "rollout-replayed" and not (dest / "rollout.json").exists()
    # the same halt again is fine; a newer document too
    (upstream.root / "rollout.json").write_bytes(halt)
    assert "rollout.json" in mirror.sync(upstream.url, dest, *pubs).downloaded
    rollout.sign(upstream.root, keys.load_private(rollout_key), halted="still bad", now=10 ** 10 // 10 * 2)
    assert mirror.sync(upstream.url, dest, *pubs).rollout["halted"] == "still bad"


def test_state_file_is_never_served_and_a_damaged_one_is_refused(tmp_path, upstream, pubs):
    dest = tmp_path / "mirror"
    mirror.sync(upstream.url, dest, *pubs)
    state = mirror.read_state(dest)
    assert list(state["rollout"].values())[0]["issued"] > 0 and list(state["release"].values()) == [{"version": "1.3.0"}]
    assert (dest / mirror.STATE_NAME).resolve() not in srv.release_files(dest)
    httpd, url = serve_in_thread(dest)
    try:
        host, port = httpd.server_address[:2]
        c = http.client.HTTPConnection(host, port, timeout=5)
        c.request("GET", "/" + mirror.STATE_NAME)
        assert c.getresponse().status == 404
        c.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    (dest / mirror.STATE_NAME).write_bytes(b"[" * 4000)
    with pytest.raises(mirror.MirrorError) as e:
        mirror.sync(upstream.url, dest, *pubs)
    assert e.value.code == "bad-state" and e.value.hint


def test_rollout_signed_by_another_key_is_refused(tmp_path, upstream, pubs, keydir):
    def change(root):
        doc = rolloutdoc.open_document((root / "rollout.json").read_bytes(), pubs[1])
        doc["issued"] += 10
        (root / "rollout.json").write_bytes(rolloutdoc.sign(doc, keys.load_private(keydir / "foreign")))
    refused(tmp_path, upstream, pubs, "rollout-unknown-key", change)


def test_oversized_payload_is_refused(tmp_path, upstream, pubs, firmware, signer):
    def change(root):
        release.build(firmware("1.4.0"), root, [signer])
        with open(root / "fw-1.4.0-healthy-esp32-0-65536.bin", "ab") as f:
            f.write(b"\0" * 100000)
    refused(tmp_path, upstream, pubs, "too-large", change)


class _Endless(BaseHTTPRequestHandler):
    """A hostile upstream: a good manifest, then a payload of endless bytes with no Content-Length."""
    protocol_version = "HTTP/1.0"
    root: Path = Path(".")
    sent = 0

    def log_message(self, *a):
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        if name in ("manifest.json", "rollout.json"):
            body = (self.root / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(20000):  # up to 1.3 GB, unless the client stops reading
                self.wfile.write(b"\xe9" * 65536)
                type(self).sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass


def test_endless_payload_is_cut_at_the_signed_size(tmp_path, upstream, pubs):
    handler = type("H", (_Endless,), {"root": upstream.root, "sent": 0})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    dest = tmp_path / "mirror"
    try:
        with pytest.raises(mirror.MirrorError) as e:
            mirror.sync("http://127.0.0.1:%d/" % httpd.server_address[1], dest, *pubs)
        assert e.value.code == "too-large"
        assert snapshot(dest) == {}  # nothing kept
        assert handler.sent < 64 << 20
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_truncated_and_stalled_upstreams_are_transport_errors(tmp_path, upstream, pubs):
    dest = tmp_path / "mirror"
    upstream.faults = [Fault(path=".bin", drop_after=1000)]
    with pytest.raises(fetch.DownloadError):
        mirror.sync(upstream.url, dest, *pubs)
    upstream.faults = [Fault(path="manifest.json", stall_after=10)]
    with pytest.raises(fetch.DownloadError):
        mirror.sync(upstream.url, dest, *pubs, timeout=1)
    assert snapshot(dest) == {}


def test_a_trickled_payload_is_too_slow(tmp_path, upstream):
    # every read comes within the timeout, but the whole would take hours: the download's own
    # deadline (2 timeouts + size / min_rate) ends it
    upstream.faults = [Fault(path=".bin", trickle=0.05)]
    url = upstream.url.rstrip("/") + "/fw-1.3.0-healthy-esp32-0-65536.bin"
    with open(tmp_path / "out", "wb") as f, pytest.raises(fetch.DownloadError) as e:
        fetch.download(url, f, 64 * 1024, timeout=0.5, min_rate=4096)
    assert e.value.code == "too-slow" and e.value.hint


def test_one_sync_at_a_time(tmp_path, upstream, pubs):
    dest = tmp_path / "mirror"
    dest.mkdir()
    with mirror._locked(dest):  # another sync holds the directory
        with pytest.raises(mirror.MirrorError) as e:
            mirror.sync(upstream.url, dest, *pubs)
    assert e.value.code == "busy" and f"PID {os.getpid()}" in str(e.value) and e.value.hint
    assert snapshot(dest) == {}
    assert mirror.sync(upstream.url, dest, *pubs).downloaded  # released with the holder


def test_every_survives_an_outage(tmp_path, upstream, pubs):
    dest = tmp_path / "mirror"
    lines, delays, good = [], [], {}

    def sleep(d):
        delays.append(d)
        if len(delays) == 1:  # after the first sync: the upstream goes down for two requests
            good.update(snapshot(dest))
            upstream.faults = [Fault(path="manifest.json", status=503, times=2)]
        else:
            assert snapshot(dest) == good  # still serving the last good copy
    failed = mirror.run(upstream.url, dest, *pubs, every=60, iterations=4, sleep=sleep, say=lines.append)
    assert failed == 2 and len(lines) == 4
    assert "published" in lines[0] and "up to date" in lines[3]
    assert all("upstream unreachable" in x and "serving the last good copy" in x for x in lines[1:3])
    assert "next try in" in lines[1]
    assert delays[0] == 60 and 60 < delays[1] < delays[2] <= mirror.BACKOFF_CAP_S * 1.1
    assert mirror.next_delay(60, 50) <= mirror.BACKOFF_CAP_S * 1.1
    assert mirror.next_delay(3600, 5) >= 3600 * 0.9  # never more often than --every


def test_cli_sync_exit_status_and_hints(tmp_path, upstream, keydir, rollout_key):
    dest = tmp_path / "mirror"
    r = subprocess.run([MPOTA, "mirror", "sync", upstream.url, dest, "--pub", keydir / "release.pub",
                        "--rollout-pub", f"{rollout_key}.pub"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "published" in r.stdout and r.stdout.strip().splitlines()[-1].startswith("mirror: verified")
    assert f"mpota serve {dest}" in r.stdout
    # no rollout key, but the upstream has a rollout.json
    r = subprocess.run([MPOTA, "mirror", "sync", upstream.url, tmp_path / "m2", "--pub", keydir / "release.pub"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--rollout-pub" in r.stderr and "hint:" in r.stderr
    # an upstream that is down
    r = subprocess.run([MPOTA, "mirror", "sync", "http://127.0.0.1:9/", tmp_path / "m3", "--pub",
                        keydir / "release.pub"], capture_output=True, text=True)
    assert r.returncode == 2 and "hint:" in r.stderr and "Traceback" not in r.stderr
    # not a URL; a private key as --pub
    r = subprocess.run([MPOTA, "mirror", "sync", "/srv/rel", tmp_path / "m4", "--pub", keydir / "release.pub"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "http" in r.stderr and "hint:" in r.stderr
    r = subprocess.run([MPOTA, "mirror", "sync", upstream.url, tmp_path / "m5", "--pub", keydir / "release"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "private key" in r.stderr
    # `mpota serve` takes the mirror directory (and refuses it once a key lands in it)
    assert subprocess.run([MPOTA, "mirror", "sync", upstream.url, dest, "--pub", keydir / "release.pub",
                           "--rollout-pub", f"{rollout_key}.pub"], capture_output=True).returncode == 0
    (dest / "oops.pem").write_bytes((keydir / "release").read_bytes())
    r = subprocess.run([MPOTA, "mirror", "sync", upstream.url, dest, "--pub", keydir / "release.pub",
                        "--rollout-pub", f"{rollout_key}.pub"], capture_output=True, text=True)
    assert r.returncode == 2 and "private keys" in r.stderr


# ---- hostile input never crashes a verifier or the --every loop -----------------------------

BOMB = b"[" * 4000


def _env_with(sigs, body=b"{}", ptype=rolloutdoc.PAYLOAD_TYPE) -> bytes:
    return json.dumps({"payloadType": ptype, "payload": base64.b64encode(body).decode(),
                       "signatures": sigs}).encode()


def test_dsse_verify_refuses_a_nesting_bomb_and_an_unhashable_keyid(pubs, rollout_key):
    with pytest.raises(dsse.EnvelopeError) as e:
        dsse.verify(BOMB, pubs[0])
    assert e.value.code == "bad-envelope"
    with pytest.raises(dsse.EnvelopeError) as e:
        dsse.verify(_env_with([{"keyid": []}, {"keyid": {}, "sig": []}]), pubs[1], rolloutdoc.PAYLOAD_TYPE)
    assert e.value.code == "unknown-key"
    # a good signature after a junk one still verifies; a junk "sig" beside a trusted keyid is no crash
    good = json.loads(dsse.sign(b"{}", [keys.load_private(rollout_key)], rolloutdoc.PAYLOAD_TYPE))
    sig = good["signatures"][0]
    assert dsse.verify(_env_with([{"keyid": []}, sig]), pubs[1], rolloutdoc.PAYLOAD_TYPE) == b"{}"
    with pytest.raises(dsse.EnvelopeError) as e:
        dsse.verify(_env_with([{"keyid": sig["keyid"], "sig": []}]), pubs[1], rolloutdoc.PAYLOAD_TYPE)
    assert e.value.code == "bad-signature"


def test_open_document_refuses_bombs_and_unhashable_keyids(pubs, rollout_key):
    for env in (BOMB, _env_with([{"keyid": []}])):
        with pytest.raises(rolloutdoc.RolloutError) as e:
            rolloutdoc.open_document(env, pubs[1])
        assert e.value.code in ("rollout-bad", "rollout-unknown-key")
    # a signed body that is itself a nesting bomb
    bomb_body = dsse.sign(b"[" * 1000, [keys.load_private(rollout_key)], rolloutdoc.PAYLOAD_TYPE)
    with pytest.raises(rolloutdoc.RolloutError) as e:
        rolloutdoc.open_document(bomb_body, pubs[1])
    assert e.value.code == "rollout-bad"


def test_every_survives_hostile_upstream_documents_and_any_exception(tmp_path, upstream, pubs, monkeypatch):
    dest = tmp_path / "mirror"
    mirror.sync(upstream.url, dest, *pubs)
    good = snapshot(dest)
    lines = []
    (upstream.root / "rollout.json").write_bytes(_env_with([{"keyid": []}]))
    assert mirror.run(upstream.url, dest, *pubs, every=60, iterations=1, sleep=lambda d: None,
                      say=lines.append) == 1
    (upstream.root / "manifest.json").write_bytes(BOMB)
    assert mirror.run(upstream.url, dest, *pubs, every=60, iterations=1, sleep=lambda d: None,
                      say=lines.append) == 1
    assert snapshot(dest) == good and all("refused" in x and "last good copy" in x for x in lines)
    # whatever one sync raises, the loop prints it, backs off and goes on
    calls, delays = [], []

    def boom(*a, **k):
        calls.append(1)
        raise (RecursionError if len(calls) == 1 else TypeError("unhashable type: 'list'"))
    monkeypatch.setattr(mirror, "sync", boom)
    lines.clear()
    assert mirror.run(upstream.url, dest, *pubs, every=60, iterations=3, sleep=delays.append,
                      say=lines.append) == 3
    assert len(calls) == 3 and "RecursionError" in lines[0] and "unhashable" in lines[1]
    assert all("serving the last good copy" in x for x in lines) and 60 < delays[0] < delays[1]
