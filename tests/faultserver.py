"""A release server for tests that can be told to misbehave (python-tuf's steerable simulator,
for HTTP): drop the connection mid-body, stall, trickle, lie about lengths, answer errors,
ignore Range, redirect in circles, send hostile headers. It records every request."""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Fault:
    path: str = ""              # applies to request paths ending with this ("" = all; "/x" = exactly /x)
    times: int = 1 << 30        # how many matching requests it affects
    status: int | None = None   # answer this status with an empty body
    retry_after: str | None = None
    drop_after: int | None = None    # close after this many body bytes
    stall_after: int | None = None   # stop sending (keep the socket open) after this many bytes
    trickle: float | None = None     # seconds between single bytes
    length_delta: int = 0            # lie in Content-Length by this much
    ignore_range: bool = False
    redirect_to: str | None = None
    header_bomb: str | None = None   # "long-line" or "many"


@dataclass
class Request:
    path: str
    range: str | None


@dataclass
class FaultServer:
    root: Path
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def start(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def do_GET(self):
                owner.requests.append(Request(self.path, self.headers.get("Range")))
                fault = owner._take(self.path)
                try:
                    owner._serve(self, fault)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = "http://127.0.0.1:%d/" % self.httpd.server_address[1]
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _take(self, path):
        for f in self.faults:
            hit = path == f.path if f.path.startswith("/") else path.endswith(f.path)
            if hit and f.times > 0:
                f.times -= 1
                return f
        return Fault(times=0)

    def _serve(self, h, f: Fault):
        if f.redirect_to is not None:
            h.send_response(302)
            h.send_header("Location", f.redirect_to)
            h.end_headers()
            return
        if f.header_bomb == "long-line":
            h.wfile.write(b"HTTP/1.0 200 OK\r\nX-Junk: " + b"a" * 100000 + b"\r\n\r\n")
            return
        if f.header_bomb == "many":
            h.wfile.write(b"HTTP/1.0 200 OK\r\n" + b"X-A: b\r\n" * 5000 + b"\r\n")
            return
        if f.status is not None:
            h.send_response(f.status)
            if f.retry_after:
                h.send_header("Retry-After", f.retry_after)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        path = self.root / h.path.lstrip("/")
        if not path.is_file():
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = path.read_bytes()
        start = 0
        m = re.match(r"bytes=(\d+)-$", h.headers.get("Range") or "")
        if m and not f.ignore_range:
            start = int(m.group(1))
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        body = data[start:]
        h.send_header("Content-Length", str(len(body) + f.length_delta))
        h.end_headers()
        if f.trickle is not None:
            for i in range(len(body)):
                h.wfile.write(body[i:i + 1])
                h.wfile.flush()
                time.sleep(f.trickle)
            return
        cut = min(x for x in (f.drop_after, f.stall_after, len(body)) if x is not None)
        h.wfile.write(body[:cut])
        h.wfile.flush()
        if f.stall_after is not None:
            time.sleep(30)
