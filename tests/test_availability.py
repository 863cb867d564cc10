"""A hostile network — a peer, a server or a mirror, without the release key — cannot stall,
freeze, wear out or blacklist a device. Each case is a server that misbehaves on purpose and the
real agent in the real micropython binary; README's "Availability" table lists them."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from faultserver import Fault
from mpota import release

SIZE = 64 * 1024


@pytest.fixture
def setup(fault_server, firmware, signer, make_device):
    d = make_device(firmware("1.0.0"), fault_server.url)
    d.config(timeout_s=1, progress_every=2)
    return fault_server, d


def payload_gets(fs, name):
    return [r for r in fs.requests if r.path.endswith(name)]


# ---- 1. failover checks every source fully and takes the best offer ---------------------------

USELESS = {
    "the release the device runs": dict(version="1.0.0"),
    "an older release": dict(version="0.9.0"),
    "a release for another board": dict(version="3.0.0", board="esp32-cam"),
    "a release still newer than the running one, but not the newest": dict(version="1.5.0"),
}


@pytest.mark.parametrize("case", sorted(USELESS))
def test_a_source_with_a_useless_signed_release_does_not_hide_a_good_mirror(case, setup, firmware, signer):
    fs, d = setup
    kw = USELESS[case]
    release.build(firmware(kw["version"], size=SIZE), fs.root, [signer], board=kw.get("board"))
    release.build(firmware("2.0.0", size=SIZE), fs.root / "mirror", [signer])
    d.config(mirrors=[fs.url + "mirror/"])
    d.run()
    st = d.status()
    assert st["version"] == "2.0.0" and st["last_error"] is None, d.output
    assert payload_gets(fs, firmware("2.0.0", size=SIZE).name)[0].path.startswith("/mirror/")


def test_a_rejected_release_on_the_primary_does_not_hide_a_good_mirror(setup, firmware, signer):
    fs, d = setup
    release.build(firmware("1.5.0", "unhealthy", size=SIZE), fs.root, [signer])
    d.run()  # 1.5.0 installs, fails its health check, is rejected
    assert d.status()["rejected"] == ["1.5.0"]
    release.build(firmware("2.0.0", size=SIZE), fs.root / "mirror", [signer])
    d.config(mirrors=[fs.url + "mirror/"])
    d.run()
    assert d.status()["version"] == "2.0.0", d.output


# ---- 2. unsigned bytes cannot exhaust the heap before the signature is checked -----------------

BOMBS = {
    "thousands of empty lists": b"[" + b"[]," * 1300 + b"[]]",
    "thousands of empty objects": b"[" + b"{}," * 1300 + b"{}]",
    "thousands of signatures": b'{"payloadType": "x", "payload": "", "signatures": ['
                               + b'{"keyid":"a","sig":"b"},' * 150 + b"{}]}",
    "thousands of numbers": b'{"signatures": [' + b"1," * 2000 + b"1]}",
}


@pytest.mark.parametrize("case", sorted(BOMBS))
def test_a_json_bomb_is_a_bad_envelope_and_the_next_source_is_tried(case, setup, firmware, signer):
    fs, d = setup
    bomb = BOMBS[case]
    assert len(bomb) <= 4096
    (fs.root / "manifest.json").write_bytes(bomb)
    release.build(firmware("2.0.0", size=SIZE), fs.root / "mirror", [signer])
    d.config(mirrors=[fs.url + "mirror/"])
    d.run()
    assert "manifest.json: bad-envelope" in d.output, d.output
    assert "no-memory" not in d.output
    assert d.status()["version"] == "2.0.0"


# ---- 3. the TLS handshake and the whole call have deadlines -------------------------------------

class Peer:
    """A TCP server that answers every connection with `talk(conn)` (a hostile TLS peer)."""

    def __init__(self, talk):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self.talk = talk
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c):
        try:
            self.talk(c)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.srv.close()


def _trickle_handshake(c):
    c.recv(4096)  # the ClientHello
    # a handshake record that announces 16 KiB, then its bytes one by one: each read gets a
    # byte well within the socket timeout, and the record would take over two hours
    c.sendall(b"\x16\x03\x03\x40\x00\x02")
    for _ in range(16384):
        c.sendall(b"\x00")
        time.sleep(0.3)


def _alert_flood(c):
    c.recv(4096)
    for _ in range(2000):
        c.sendall(b"\x15\x03\x03\x00\x02\x01\x64")  # TLS warning alerts (no_renegotiation)
        time.sleep(0.01)


@pytest.mark.parametrize("talk", [_trickle_handshake, _alert_flood], ids=["trickled handshake", "alert flood"])
def test_a_tls_peer_cannot_hold_the_device(talk, firmware, make_device, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from test_tls import make_ca
    _, ca = make_ca("any")
    (tmp_path / "ca.der").write_bytes(ca.public_bytes(serialization.Encoding.DER))
    peer = Peer(talk)
    try:
        d = make_device(firmware("1.0.0"), f"https://127.0.0.1:{peer.port}/", ca=tmp_path / "ca.der")
        d.config(timeout_s=1)
        boots = d.run(hang_s=60)
    finally:
        peer.close()
    assert boots[-1].exit == "idle", d.output  # not hung: the call ended by itself
    st = d.status()
    assert st["last_error"] in ("network", "too-slow") and st["version"] == "1.0.0", st


def test_the_whole_call_has_a_deadline(firmware, make_device, tmp_path):
    # http.limit(): whatever each read's own deadline, nothing waits past the call's
    from conftest import run_micropython
    peer = Peer(lambda c: (c.recv(4096), c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 99999\r\n\r\n"),
                           [(c.sendall(b"x" * 100), time.sleep(0.1)) for _ in range(100)]))
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/")
    script = f"""
from ota import http
from ota.errors import OtaError
http.limit(1500)
r = http.get("http://127.0.0.1:{peer.port}/x", 5)
buf = bytearray(4096)
try:
    while http.read_full(r, buf):
        pass
    print("read it all")
except OtaError as e:
    print(e.code, e.detail)
"""
    try:
        out = run_micropython(script, path=f".frozen:{d.dev.fs / 'lib'}", tmp_path=tmp_path)
    finally:
        peer.close()
    assert "too-slow the update ran out of time" in out, out


# ---- 4. the minimum rate holds for chunked payloads too -----------------------------------------

def test_a_trickled_compressed_payload_is_too_slow(setup, firmware, signer):
    fs, d = setup
    rel = release.build(firmware("2.0.0", size=SIZE), fs.root, [signer], compress=True, chunk=16 * 1024)
    fs.faults = [Fault(path=rel.manifest["payload"]["url"], trickle=0.004)]  # ~250 bytes/s
    d.run(hang_s=60)
    st = d.status()
    assert st["last_error"] == "too-slow" and st["version"] == "1.0.0", d.output


# ---- 5. a bad payload is not downloaded and flashed again at every call -------------------------

def test_a_payload_that_does_not_verify_is_backed_off(setup, firmware, signer, tmp_path):
    from mpota.sim import runner
    fs, d = setup
    rel = release.build(firmware("2.0.0", size=SIZE), fs.root, [signer])
    p = fs.root / rel.manifest["payload"]["url"]
    data = bytearray(p.read_bytes())
    data[-100] ^= 1  # the mirror serves a corrupted payload
    p.write_bytes(data)
    # 60 checks (an hour at one a minute): downloaded at checks 1, 3, 7, 15, 31 (back-off)
    (d.dev.fs / "main.py").write_text("import ota\nota.confirm()\nfor i in range(60):\n    ota.update()\n")
    cut = runner.PowerCut(None, ops_file=tmp_path / "ops")
    d.run(cut=cut)
    gets = payload_gets(fs, p.name)
    assert len(gets) == 5, [r.path for r in gets]
    assert d.status()["last_error"] == "backoff" and "hash-mismatch" in d.status()["detail"]
    blocks = SIZE // 4096 + 1
    assert cut.erases <= 5 * blocks + 4, cut.erases  # 5 slot writes, not 60


def test_a_chunked_payload_keeps_the_chunks_that_verified(setup, firmware, signer):
    fs, d = setup
    rel = release.build(firmware("2.0.0", size=SIZE), fs.root, [signer], compress=True, chunk=16 * 1024)
    pay = rel.manifest["payload"]
    p = fs.root / pay["url"]
    good = p.read_bytes()
    sizes = [c[0] for c in pay["chunks"]]
    bad = bytearray(good)
    bad[sizes[0] + sizes[1] + 10] ^= 1  # the third chunk is corrupted
    p.write_bytes(bad)
    d.run()
    assert d.status()["last_error"] == "hash-mismatch"
    assert d.state()["progress"]["chunk"] == 2
    p.write_bytes(good)  # the mirror is fixed
    fs.requests.clear()
    (d.dev.fs / "main.py").write_text("import ota\nota.confirm()\nota.update()\nota.update()\n")  # one skipped
    d.run()
    assert d.status()["version"] == "2.0.0", d.output
    assert payload_gets(fs, pay["url"])[0].range == f"bytes={sizes[0] + sizes[1]}-"


# ---- 6. the owner can clear a rejection --------------------------------------------------------

def test_forget_and_a_re_signed_release_are_tried_again(setup, firmware, signer):
    fs, d = setup
    release.build(firmware("2.0.0", "unhealthy", size=SIZE), fs.root, [signer])
    d.run()
    assert d.status()["rejected"] == ["2.0.0"]
    d.run()
    assert "rejected before" in d.output
    # ota.forget(): the owner says try it again
    from mpota.sim import runner
    env = runner.firmware_env(d.dev, d.dev.running)
    rc, out = runner.run_micropython(d.dev, ["-c", "import ota; print(ota.forget('2.0.0'))"], env, d.dev.heap)
    assert rc == 0 and "['2.0.0']" in out, out
    d.run()
    assert "installing 2.0.0" in d.output and d.status()["rejected"] == ["2.0.0"]
    # rebuilt with `mpota release` (a new issue time): a new manifest digest, tried afresh
    first = json.loads((fs.root / "manifest.json").read_text())
    time.sleep(1.1)
    release.build(firmware("2.0.0", "unhealthy", size=SIZE), fs.root, [signer])
    assert json.loads((fs.root / "manifest.json").read_text())["payload"] != first["payload"]
    d.run()
    assert "installing 2.0.0" in d.output


# ---- 8. the largest manifest the host signs verifies at the heap floor --------------------------

def test_the_largest_manifest_mpota_signs_installs_at_the_heap_floor(setup, firmware, signer, tmp_path):
    from mpota import keys
    fs, d = setup
    img = firmware("2.0.0", size=300 * 1024)
    # as many chunks (4 KiB each) and signatures as fit under the device's 4 KiB manifest cap
    signers = [signer]
    for i in range(7):
        keys.generate(tmp_path / f"k{i}")
        signers.append(keys.load_private(tmp_path / f"k{i}"))
    best = None
    for n in range(1, 9):
        for chunk in (4096, 8192, 12288, 16384, 32768):
            try:
                release.build(img, tmp_path / "try", signers[:n], compress=True, chunk=chunk)
            except release.ReleaseError:
                continue
            size = len((tmp_path / "try" / "manifest.json").read_bytes())
            if best is None or size > best[0]:
                best = (size, n, chunk)
            break
    size, n, chunk = best
    assert size > 3500, best
    release.build(img, fs.root, signers[:n], compress=True, chunk=chunk)
    from mpota.sim.device import HEAP_FLOOR
    d.run(heap=HEAP_FLOOR)
    st = d.status()
    assert st["version"] == "2.0.0" and st["last_error"] is None, d.output


# ---- 9. hardening --------------------------------------------------------------------------------

def test_a_redirect_from_https_to_http_is_refused(firmware, make_device, tmp_path, signer):
    import ssl
    from cryptography.hazmat.primitives import serialization
    from test_tls import make_ca, make_leaf
    ca_key, ca = make_ca("t")
    key, cert = make_leaf(ca_key, ca, "127.0.0.1")
    (tmp_path / "ca.der").write_bytes(ca.public_bytes(serialization.Encoding.DER))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")

    def talk(c):
        s = ctx.wrap_socket(c, server_side=True)
        s.recv(4096)
        s.sendall(b"HTTP/1.0 302 Found\r\nLocation: http://127.0.0.1:9/manifest.json\r\n\r\n")
        s.close()
    peer = Peer(talk)
    try:
        d = make_device(firmware("1.0.0"), f"https://127.0.0.1:{peer.port}/", ca=tmp_path / "ca.der")
        d.run()
    finally:
        peer.close()
    st = d.status()
    assert st["last_error"] == "bad-response" and "redirect from https" in st["detail"], st


def test_a_chunked_resume_checks_content_range(setup, firmware, signer):
    fs, d = setup
    rel = release.build(firmware("2.0.0", size=SIZE), fs.root, [signer], compress=True, chunk=16 * 1024)
    pay = rel.manifest["payload"]
    sizes = [c[0] for c in pay["chunks"]]
    fs.faults = [Fault(path=pay["url"], drop_after=sizes[0] + sizes[1] + 10, times=1),
                 Fault(path=pay["url"], content_range="bytes 0-"), ]
    d.run()
    st = d.status()
    assert st["last_error"] == "bad-response" and "Content-Range" in st["detail"], d.output
    assert d.state()["progress"]["chunk"] == 2  # the server's fault: nothing thrown away


def test_no_slot_is_a_bootable_image_before_it_verified(setup, firmware, signer):
    # the image's first byte (its magic) goes in last: a download cut short leaves a slot that
    # no bootloader takes for an app image
    fs, d = setup
    rel = release.build(firmware("2.0.0", size=SIZE), fs.root, [signer])
    name = rel.manifest["payload"]["url"]
    fs.faults = [Fault(path=name, drop_after=SIZE - 5000, times=1), Fault(path=name, status=503)]
    d.run()
    assert d.status()["last_error"] == "http-503", d.output
    img = firmware("2.0.0", size=SIZE).read_bytes()
    assert d.slot_bytes(1, 1) == b"\xff" and d.slot_bytes(1, 4096)[1:] == img[1:4096]
    fs.faults = []
    d.run()
    assert d.status()["version"] == "2.0.0" and d.slot_bytes(1, 1) == b"\xe9"


def test_the_security_floor_is_also_the_running_images(setup, firmware, signer, make_device):
    # state file lost or edited: the running image's own secure_version still holds the line
    fs, d0 = setup
    d = make_device(firmware("1.0.0", secure_version=5), fs.url, name="sec")
    release.build(firmware("2.0.0", secure_version=3, size=SIZE), fs.root, [signer])
    d.run()
    st = d.status()
    assert st["last_error"] == "security-counter" and "floor 5" in st["detail"], st


def test_an_absurd_status_line_is_a_bad_response_not_an_error_code(setup):
    fs, d = setup
    (fs.root / "manifest.json").write_text("{}")
    fs.faults = [Fault(path="manifest.json", raw_status_line="HTTP/1.0 " + "5" * 400 + " Oops")]
    d.run()
    st = d.status()
    assert st["last_error"] == "bad-response", st
