"""The reference update server: static files over HTTP with HEAD, Range and ETag.

Any static server works for mpota (the device also copes with servers that ignore Range);
this one is small, strict about paths, and logs one line per request.

It serves only what a release is (release_files): manifest.json (as it is) and the other signed
documents in the directory (DSSE envelopes: any *.json of the form {"payloadType", "payload",
"signatures"}), and the payload files their bodies name (payload.url, relative to the
document). Everything else is 404, whatever lies in the directory; a file that looks like a
private key is never served. `mpota serve` also refuses to start on a directory that is not a
release or that holds private keys (check_release_dir).
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import MpotaError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_TYPES = {".json": "application/json", ".bin": "application/octet-stream"}
MANIFEST_NAME = "manifest.json"
_SMALL = 64 * 1024  # key files are small: larger files are never taken for one


# ---- what a release is --------------------------------------------------------------------------
def envelope_body(data: bytes) -> bytes | None:
    """The payload bytes of a DSSE envelope ({"payloadType", "payload", "signatures"}), else
    None. Nothing is verified here: the server only needs to know what is a signed document."""
    try:
        env = json.loads(data)
        if not (isinstance(env, dict) and isinstance(env.get("payloadType"), str)
                and isinstance(env.get("signatures"), list) and isinstance(env.get("payload"), str)):
            return None
        return base64.b64decode(env["payload"])
    except (ValueError, binascii.Error, RecursionError):
        return None


def release_files(root: Path) -> set[Path]:
    """The files under `root` that make up releases: every manifest.json (whatever it holds: the
    device is the one to judge it), every other DSSE envelope (*.json) and the payload file each
    one's body names (payload.url relative to the envelope, inside root)."""
    root = Path(root).resolve()
    found = set()
    for doc in root.rglob("*.json"):
        try:
            body = envelope_body(doc.read_bytes()) if doc.is_file() else None
        except OSError:
            body = None
        if doc.name == MANIFEST_NAME and doc.is_file():
            found.add(doc.resolve())
        if body is None:
            continue
        found.add(doc.resolve())
        try:
            url = json.loads(body)["payload"]["url"]
        except (ValueError, KeyError, TypeError, RecursionError):
            continue
        if not isinstance(url, str) or not url or "://" in url or url.startswith("/"):
            continue
        target = (doc.parent / url.split("?")[0]).resolve()
        if root in target.parents and target.is_file():
            found.add(target)
    return found


def private_key_kind(path: Path) -> str | None:
    """"PEM private key" or "mpota AES key" if the file is one (by its content), else None."""
    try:
        if not path.is_file() or path.stat().st_size > _SMALL:
            return None
        data = path.read_bytes().strip()
    except OSError:
        return None
    first = data.split(b"\n", 1)[0]
    if first.startswith(b"-----BEGIN") and b"PRIVATE KEY" in first:
        return "PEM private key"
    if len(data) == 64 and all(c in b"0123456789abcdefABCDEF" for c in data):
        return "mpota AES key"
    return None


def check_release_dir(root: Path) -> None:
    """Refuse to serve a directory that is not a release (no manifest.json) or that holds
    private keys (PEM private keys, mpota AES key files): they would be one URL away."""
    root = Path(root)
    if not root.is_dir():
        raise MpotaError(f"{root} is not a directory", hint="pass the release directory made by `mpota release`")
    secrets = [(p, kind) for p in sorted(root.rglob("*")) if (kind := private_key_kind(p))]
    if secrets:
        listed = ", ".join(f"{p.relative_to(root)} ({kind})" for p, kind in secrets[:5])
        raise MpotaError(f"{root} holds private keys: {listed}; refusing to serve it",
                         hint="keep keys outside the release directory (e.g. keys/), then serve the "
                              "directory `mpota release --out` wrote")
    manifest = root / MANIFEST_NAME
    if not manifest.is_file() or envelope_body(manifest.read_bytes()) is None:
        raise MpotaError(f"{root} is not a release: no signed {MANIFEST_NAME} in it",
                         hint="make one with: mpota release FIRMWARE.bin --key keys/release --out "
                              f"{root}, then serve that directory")


def lan_addresses() -> list[str]:
    """This machine's addresses that another machine on the network could reach (not
    loopback, link-local or unspecified): what devices should be given when the server listens
    on 0.0.0.0 or ::. No packet is sent (a UDP socket is only connected, to learn the
    source address of the default route)."""
    found = []
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                found.append(s.getsockname()[0])
        except OSError:
            pass
    try:
        found += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
    except OSError:
        pass
    out = []
    for a in found:
        try:
            ip = ipaddress.ip_address(a.split("%")[0])
        except ValueError:
            continue
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified or str(ip) in out:
            continue
        out.append(str(ip))
    return out


def urls_for(host: str, port: int) -> list[str]:
    """The URLs devices should use for a server listening on host:port."""
    wildcard = host in ("0.0.0.0", "::", "")
    hosts = lan_addresses() if wildcard else [host]
    if host == "0.0.0.0":
        hosts = [h for h in hosts if ":" not in h]
    return [f"http://{'[' + h + ']' if ':' in h else h}:{port}/" for h in hosts]


def combined_log_line(host: str, request_line: str, status, size, referer: str | None, agent: str | None,
                      when: float | None = None) -> str:
    """One request in the Combined Log Format (Apache's, nginx's default), which log tools and
    `mpota fleet import-logs` read: a device that announces itself (docs/fleet.md) is named in
    the request's query string and in its User-Agent."""
    def q(text):
        return (text or "-").replace("\\", "\\\\").replace('"', '\\"')
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(when))
    return f'{host} - - [{stamp}] "{q(request_line)}" {status} {size} "{q(referer)}" "{q(agent)}"\n'


class ReleaseHandler(BaseHTTPRequestHandler):
    server_version = "mpota-serve"
    protocol_version = "HTTP/1.1"
    root: Path = Path(".")
    quiet = False
    access_log = None  # a text file: one Combined Log Format line per request (serve --access-log)

    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write("serve: %s %s\n" % (self.address_string(), fmt % args))

    def log_request(self, code="-", size="-"):
        super().log_request(code, size)
        if self.access_log is not None:
            self.access_log.write(combined_log_line(self.client_address[0], self.requestline, int(code), size,
                                                    self.headers.get("Referer"), self.headers.get("User-Agent")))
            self.access_log.flush()

    def _resolve(self) -> Path | None:
        """The release file the request names, or None (404): anything else in the directory,
        and any path outside it, does not exist for a client."""
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        try:
            path = (self.root / rel).resolve()
            if self.root not in path.parents or not path.is_file():
                return None
            if path not in release_files(self.root) or private_key_kind(path):
                return None
            return path
        except (OSError, ValueError):  # a NUL byte, a name too long for the OS, ...
            return None

    def _plain(self, status, text=""):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = self._resolve()
        if path is None:
            return self._plain(HTTPStatus.NOT_FOUND, "not found\n")
        st = path.stat()
        size = st.st_size
        etag = '"%x-%x"' % (size, st.st_mtime_ns)
        if self.headers.get("If-None-Match") == etag:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        start, end, status = 0, size - 1, HTTPStatus.OK
        rng = self.headers.get("Range")
        if rng and self.headers.get("If-Range", etag) == etag:
            m = _RANGE.match(rng.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:
                    start = max(0, size - int(m.group(2)))
                if start >= size or start > end:
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = HTTPStatus.PARTIAL_CONTENT
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", _TYPES.get(path.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(path, "rb") as f:
            f.seek(start)
            left = length
            while left:
                chunk = f.read(min(left, 1 << 16))
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                left -= len(chunk)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer whose listening socket never blocks: a client that connects and resets
    at once makes select() say "ready" and a blocking accept() then wait for the next client —
    and shutdown() with it. Non-blocking, that accept() fails and is skipped (socketserver's
    _handle_request_noblock); the accepted sockets are blocking as usual."""

    def server_activate(self):
        super().server_activate()
        self.socket.setblocking(False)


def server_class(host: str) -> type:
    """The server for the address family of `host` (:: and IPv6 addresses need AF_INET6; on ::
    the OS usually accepts IPv4 too)."""
    if ":" not in host:
        return _Server
    return type("ThreadingHTTPServer6", (_Server,), {"address_family": socket.AF_INET6})


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False, access_log=None):
    """access_log: a text file for a Combined Log Format line per request (or None)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise MpotaError(f"{root} is not a directory", hint="pass the release directory made by `mpota release`")
    handler = type("Handler", (ReleaseHandler,), {"root": root, "quiet": quiet, "access_log": access_log})
    try:
        server = server_class(host)((host, port), handler)
    except OSError as e:
        raise MpotaError(f"cannot listen on {host}:{port}: {e.strerror}",
                         hint="is another server running there? pick another --port") from None
    server.daemon_threads = True
    return server


def serve_in_thread(root: Path, host="127.0.0.1", port=0, quiet=True, access_log=None):
    """Start a server on a background thread; returns (server, base_url). For tests and the demo."""
    server = make_server(root, host, port, quiet, access_log)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, "http://%s:%d/" % server.server_address[:2]
