"""The reference server: HEAD, Range, ETag, only the release's files, nothing outside the
release directory; `mpota serve` refuses directories that are not releases or hold keys."""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mpota import dsse, server as srv
from mpota.server import serve_in_thread

MPOTA = str(Path(sys.executable).parent / "mpota")


def signed(path: Path, body: dict, key, payload_type=dsse.PAYLOAD_TYPE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(dsse.sign(json.dumps(body).encode(), [key], payload_type))


@pytest.fixture
def served(tmp_path, signer):
    root = tmp_path / "rel"
    root.mkdir()
    (root / "fw.bin").write_bytes(bytes(range(256)) * 40)
    signed(root / "manifest.json", {"payload": {"url": "fw.bin"}}, signer)
    (tmp_path / "secret").write_text("no")
    httpd, url = serve_in_thread(root)
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def req(port, method, path, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r, body


def test_get_head_and_etag(served):
    r, body = req(served, "GET", "/fw.bin")
    assert r.status == 200 and body == bytes(range(256)) * 40
    assert r.getheader("Accept-Ranges") == "bytes"
    etag = r.getheader("ETag")
    r, body = req(served, "HEAD", "/fw.bin")
    assert r.status == 200 and body == b"" and r.getheader("Content-Length") == str(256 * 40)
    r, _ = req(served, "GET", "/fw.bin", {"If-None-Match": etag})
    assert r.status == 304


@pytest.mark.parametrize("rng,status,start,end", [
    ("bytes=100-199", 206, 100, 199),
    ("bytes=10000-", 206, 10000, 10239),
    ("bytes=-16", 206, 10224, 10239),
    ("bytes=10000-99999", 206, 10000, 10239),
])
def test_range(served, rng, status, start, end):
    r, body = req(served, "GET", "/fw.bin", {"Range": rng})
    assert r.status == status
    assert body == (bytes(range(256)) * 40)[start:end + 1]
    assert r.getheader("Content-Range") == f"bytes {start}-{end}/10240"


def test_unsatisfiable_range_and_stale_if_range(served):
    r, _ = req(served, "GET", "/fw.bin", {"Range": "bytes=20000-"})
    assert r.status == 416 and r.getheader("Content-Range") == "bytes */10240"
    r, body = req(served, "GET", "/fw.bin", {"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert r.status == 200 and len(body) == 10240


@pytest.mark.parametrize("path", ["/../secret", "/%2e%2e/secret", "/nope.bin", "/", "/fw.bin%00", "/%00",
                                  "/" + "a" * 5000 + ".bin"])
def test_nothing_outside_the_release(served, path):
    r, _ = req(served, "GET", path)
    assert r.status == 404


def test_only_the_release_is_served(tmp_path, signer, keydir):
    root = tmp_path / "rel"
    signed(root / "manifest.json", {"version": "2.0.0", "payload": {"url": "fw-2.0.0.bin"}}, signer)
    (root / "fw-2.0.0.bin").write_bytes(b"new" * 100)
    (root / "fw-1.0.0.bin").write_bytes(b"old" * 100)       # an older payload no document names
    signed(root / "rollout.json", {"wave": 1}, signer, "application/vnd.mpota.rollout+json")
    signed(root / "mirror" / "manifest.json", {"payload": {"url": "../fw-2.0.0.bin"}}, signer)
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_bytes(b"garbage")  # a manifest is served as it is: devices judge it
    (root / "notes.txt").write_text("internal")
    (root / "config.json").write_text(json.dumps({"not": "an envelope"}))
    (root / "release").write_bytes((keydir / "release").read_bytes())   # a private key, added later
    (root / "payload.json").write_bytes((keydir / "release").read_bytes())
    httpd, _url = serve_in_thread(root)
    port = httpd.server_address[1]
    try:
        for path in ("/manifest.json", "/fw-2.0.0.bin", "/rollout.json", "/mirror/manifest.json",
                     "/broken/manifest.json"):
            assert req(port, "GET", path)[0].status == 200, path
        for path in ("/fw-1.0.0.bin", "/notes.txt", "/config.json", "/release", "/payload.json", "/mirror/",
                     "/mirror", "/"):
            assert req(port, "GET", path)[0].status == 404, path
        # what is served follows the manifest: publish 1.0.0's payload and it is there
        signed(root / "manifest.json", {"payload": {"url": "fw-1.0.0.bin"}}, signer)
        assert req(port, "GET", "/fw-1.0.0.bin")[0].status == 200
        assert req(port, "GET", "/fw-2.0.0.bin")[0].status == 200  # the mirror's manifest still names it
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_serve_refuses_what_is_not_a_release_or_holds_keys(tmp_path, keydir, signer):
    def run(d):
        return subprocess.run([MPOTA, "serve", d, "--port", "0"], capture_output=True, text=True, timeout=30)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "fw.bin").write_bytes(b"x")
    r = run(tmp_path / "empty")
    assert r.returncode == 2 and "is not a release" in r.stderr and "mpota release" in r.stderr
    for name, content in (("keys/release", (keydir / "release").read_bytes()),
                          ("fw.aes", b"ab" * 32 + b"\n")):
        d = tmp_path / name.replace("/", "_")
        signed(d / "manifest.json", {"payload": {"url": "fw.bin"}}, signer)
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(content)
        r = run(d)
        assert r.returncode == 2, r.stderr
        assert "holds private keys" in r.stderr and Path(name).name in r.stderr and "hint:" in r.stderr
        assert ("PEM private key" if "keys" in name else "mpota AES key") in r.stderr


def test_lan_addresses_are_never_loopback():
    import ipaddress
    for a in srv.lan_addresses():
        ip = ipaddress.ip_address(a)
        assert not (ip.is_loopback or ip.is_link_local or ip.is_unspecified), a
    assert srv.urls_for("127.0.0.1", 8000) == ["http://127.0.0.1:8000/"]
    assert all("127.0.0.1" not in u for u in srv.urls_for("0.0.0.0", 8000))


def test_serve_on_every_interface_says_which_address_devices_use(tmp_path, signer):
    root = tmp_path / "rel"
    signed(root / "manifest.json", {"payload": {"url": "fw.bin"}}, signer)
    p = subprocess.Popen([MPOTA, "serve", root, "--host", "0.0.0.0", "--port", "0", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()
        second = p.stdout.readline()
    finally:
        p.terminate()
        p.communicate(timeout=10)
    assert "on http://0.0.0.0:" in first and "only the release files" in first
    addrs = srv.lan_addresses()
    if addrs:
        assert "devices use --server http://" in second and addrs[0] in second and "127.0.0.1" not in second
    else:
        assert "no address other machines can reach" in second
