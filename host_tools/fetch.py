"""Bounded HTTP(S) GETs for the host: `mpota rollout show URL` and `mpota mirror sync`.

Every read is bounded by what the caller expects (a signed document's 4 KiB, a payload's size
from its signed manifest): a hostile or broken server cannot make the host read or store more
than that. TLS certificates are checked (urllib's default context); redirects are followed as
urllib does (at most 10). A transport problem is a DownloadError (try again later); a server
that sends more than it may is a TooLarge (a refusal).
"""
from __future__ import annotations

import hashlib
import http.client
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin, urlsplit

from . import MpotaError, __version__

BLOCK = 1 << 16
MIN_RATE = 4096  # bytes per second a payload download must keep up on average (after 2 timeouts)


class DownloadError(MpotaError):
    """The server could not be reached or did not answer in full: a transport problem, worth a retry."""

    def __init__(self, message, hint=None, code="download-failed"):
        super().__init__(message, hint)
        self.code = code


class TooLarge(MpotaError):
    """The server sent (or announced) more bytes than the caller allows."""

    def __init__(self, message, hint=None):
        super().__init__(message, hint)
        self.code = "too-large"


def check_base_url(url: str) -> str:
    """`url` as a directory URL (ending in /), if it is http or https; MpotaError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise MpotaError(f"{url!r} is not an http:// or https:// URL",
                         hint="give the URL of the release directory, e.g. https://updates.example.com/esp32/")
    if parts.query or parts.fragment:
        raise MpotaError(f"{url!r}: a release directory URL has no ?query or #fragment")
    return url if url.endswith("/") else url + "/"


def join(base: str, name: str) -> str:
    return urljoin(base, name)


def _open(url: str, timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": f"mpota/{__version__} (mirror)"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404:
            return None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}", hint="is the upstream server up? try again later",
                            code=f"http-{e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"{url}: {reason}", hint="check the URL and the network; the upstream may be down "
                                                    "(try again later)") from None


def _announced(resp, url: str, limit: int) -> None:
    length = resp.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise TooLarge(f"{url}: the server announces {int(length)} bytes; at most {limit} are expected")


def get(url: str, limit: int, timeout: float = 30) -> bytes | None:
    """The body of `url` (at most `limit` bytes, within `timeout` seconds in all), or None on 404."""
    deadline = time.monotonic() + timeout
    resp = _open(url, timeout)
    if resp is None:
        return None
    with resp:
        _announced(resp, url, limit)
        data = bytearray()
        try:
            while len(data) <= limit:
                if time.monotonic() > deadline:
                    raise DownloadError(f"{url}: not received within {timeout:g} s",
                                        hint="the upstream is slow or stalled; try again later (--timeout)")
                chunk = resp.read1(min(BLOCK, limit + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
        except (OSError, socket.timeout, urllib.error.URLError) as e:
            raise DownloadError(f"{url}: connection lost ({e})", hint="try again later") from None
        except http.client.HTTPException:
            raise DownloadError(f"{url}: connection lost after {len(data)} bytes", hint="try again later") from None
    if len(data) > limit:
        raise TooLarge(f"{url}: more than {limit} bytes")
    return bytes(data)


def download(url: str, out, size: int, timeout: float = 30, progress=None, min_rate: int = MIN_RATE) -> str:
    """Stream `url` into the binary file `out`: at most `size` bytes (more is TooLarge, fewer a
    DownloadError), each read within `timeout` seconds and the whole within 2 timeouts plus
    `size / min_rate` seconds (a server that trickles a byte per timeout cannot hold a sync for
    days). Returns the SHA-256 (hex) of what was written. `progress(done, size)` is called after
    each block. A 404 is a DownloadError too."""
    allowed = 2 * timeout + size / min_rate
    deadline = time.monotonic() + allowed
    resp = _open(url, timeout)
    if resp is None:
        raise DownloadError(f"{url}: not found (404)", hint="the upstream's manifest names a payload it does not "
                                                           "serve; try again when the upstream is complete",
                            code="http-404")
    h = hashlib.sha256()
    done = 0
    with resp:
        _announced(resp, url, size)
        try:
            while True:
                if time.monotonic() > deadline:
                    raise DownloadError(f"{url}: {done} of {size} bytes in {allowed:.0f} s, below "
                                        f"{min_rate} bytes/s", hint="the upstream is too slow or trickles "
                                        "data; try again later", code="too-slow")
                chunk = resp.read1(min(BLOCK, size + 1 - done))
                if not chunk:
                    break
                done += len(chunk)
                if done > size:
                    raise TooLarge(f"{url}: more than the {size} bytes the signed manifest gives")
                h.update(chunk)
                out.write(chunk)
                if progress:
                    progress(done, size)
        except (OSError, socket.timeout, urllib.error.URLError) as e:
            raise DownloadError(f"{url}: connection lost after {done} bytes ({e})", hint="try again later") from None
        except http.client.HTTPException:
            raise DownloadError(f"{url}: connection lost after {done} bytes", hint="try again later") from None
    if done < size:
        raise DownloadError(f"{url}: {done} bytes received, the signed manifest gives {size}",
                            hint="the connection ended early or the upstream's file is short; try again later",
                            code="truncated")
    return h.hexdigest()
