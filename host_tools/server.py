"""The reference update server: static files over HTTP with HEAD, Range and ETag.

Any static server works for mpota (the device also copes with servers that ignore Range);
this one is small, strict about paths, and logs one line per request.
"""
from __future__ import annotations

import re
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import MpotaError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_TYPES = {".json": "application/json", ".bin": "application/octet-stream"}


class ReleaseHandler(BaseHTTPRequestHandler):
    server_version = "mpota-serve"
    protocol_version = "HTTP/1.1"
    root: Path = Path(".")
    quiet = False

    def log_message(self, fmt, *args):
        if not self.quiet:
            sys.stderr.write("serve: %s %s\n" % (self.address_string(), fmt % args))

    def _resolve(self) -> Path | None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        try:
            path = (self.root / rel).resolve()
            if path != self.root and self.root not in path.parents:
                return None
            if path.is_dir():
                path = path / "index.html"
            return path if path.is_file() else None
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


def make_server(root: Path, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False):
    root = Path(root).resolve()
    if not root.is_dir():
        raise MpotaError(f"{root} is not a directory", hint="pass the release directory made by `mpota release`")
    handler = type("Handler", (ReleaseHandler,), {"root": root, "quiet": quiet})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise MpotaError(f"cannot listen on {host}:{port}: {e.strerror}",
                         hint="is another server running there? pick another --port") from None
    server.daemon_threads = True
    return server


def serve_in_thread(root: Path, host="127.0.0.1", port=0, quiet=True):
    """Start a server on a background thread; returns (server, base_url). For tests and the demo."""
    server = make_server(root, host, port, quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, "http://%s:%d/" % server.server_address[:2]
