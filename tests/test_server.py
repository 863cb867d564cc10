"""The reference server: HEAD, Range, ETag, and nothing outside the release directory."""
from __future__ import annotations

import http.client

import pytest

from mpota.server import serve_in_thread


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "rel"
    root.mkdir()
    (root / "fw.bin").write_bytes(bytes(range(256)) * 40)
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
