"""A release server that can be told to misbehave (python-tuf's steerable simulator, for HTTP):
drop the connection mid-body, stall, trickle, lie about lengths, answer errors, ignore Range,
redirect in circles, send hostile headers. It records every request.

The tests steer it directly (FaultServer.faults); QA steers it from the command line:
`mpota serve DIR --fault drop-after=30000 --fault status=503,path=manifest.json,times=2`
(parse_fault() reads those switches). Like `mpota serve` it serves only the release's files
(server.release_files) unless told otherwise. HTTP/1.0, GET only, Range `bytes=N-`.
"""
from __future__ import annotations

import re
import select
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from . import server as _server

STALL_S = 300.0  # a stalled answer keeps the connection open this long, or until the client leaves


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
    content_range: str | None = None  # send this Content-Range on a 206 instead of the true one
    raw_status_line: str | None = None  # answer only this status line (and an empty header)

    def describe(self) -> str:
        what = next((f"{k.replace('_', '-')}={v}" for k, v in (
            ("status", self.status), ("drop_after", self.drop_after), ("stall_after", self.stall_after),
            ("trickle", self.trickle), ("redirect_to", self.redirect_to), ("header_bomb", self.header_bomb))
            if v is not None), "ignore-range" if self.ignore_range else "none")
        return what + (f" on *{self.path}" if self.path else "")


# The command-line switches (`--fault SPEC`): the fault, then optional `,path=SUFFIX`,
# `,times=N`, `,retry-after=SECONDS` (with status). name -> (Fault field, parser, check, help)
def _count(text):
    n = int(text)
    if n < 0:
        raise ValueError("must be 0 or more")
    return n


def _seconds(text):
    s = float(text)
    if not 0 < s <= 10:
        raise ValueError("must be more than 0 and at most 10 seconds")
    return s


def _status(text):
    n = int(text)
    if not 100 <= n <= 599:
        raise ValueError("must be an HTTP status from 100 to 599")
    return n


SWITCHES = {
    "drop-after": ("drop_after", _count, "close the connection after N bytes of the body"),
    "stall-after": ("stall_after", _count, "send N bytes of the body, then nothing (the connection stays open)"),
    "trickle": ("trickle", _seconds, "send the body one byte every SECONDS"),
    "status": ("status", _status, "answer with this HTTP status and an empty body"),
    "ignore-range": ("ignore_range", None, "answer 200 with the whole file to a Range request"),
}
OPTIONS = {
    "path": ("path", str),
    "times": ("times", _count),
    "retry-after": ("retry_after", str),
}


def parse_fault(spec: str) -> Fault:
    """'drop-after=30000,path=fw.bin,times=1' -> Fault; ValueError with the reason otherwise."""
    items = [i.strip() for i in spec.split(",") if i.strip()]
    if not items:
        raise ValueError("empty fault")
    kw = {}
    for n, item in enumerate(items):
        name, eq, value = item.partition("=")
        table = SWITCHES if n == 0 else OPTIONS
        if name not in table:
            expected = ", ".join(SWITCHES) if n == 0 else ", ".join(OPTIONS)
            raise ValueError(f"{name!r} is not a {'fault' if n == 0 else 'fault option'} (one of: {expected})")
        attr, parse = table[name][0], table[name][1]
        if parse is None:
            if eq:
                raise ValueError(f"{name} takes no value")
            kw[attr] = True
            continue
        if not eq or not value:
            raise ValueError(f"{name} needs a value: {name}=...")
        try:
            kw[attr] = parse(value)
        except ValueError as e:
            raise ValueError(f"{name}={value}: {e}") from None
    return Fault(**kw)


@dataclass
class Request:
    path: str
    range: str | None


@dataclass
class FaultServer:
    root: Path
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    only_release: bool = True   # serve only what server.release_files() lists
    log: object = None          # called with one line per request (the CLI prints them)

    def start(self, thread: bool = True):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def do_GET(self):
                owner.requests.append(Request(self.path, self.headers.get("Range")))
                fault = owner._take(self.path)
                if owner.log:
                    owner.log(f"{self.client_address[0]} GET {self.path}"
                              + (f" Range {self.headers['Range']}" if self.headers.get("Range") else "")
                              + (f" -> fault {fault.describe()}" if fault else ""))
                try:
                    owner._serve(self, fault or Fault(times=0))
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.root = Path(self.root).resolve()
        self.httpd = _server.server_class(self.host)((self.host, self.port), Handler)
        self.httpd.daemon_threads = True
        host, port = self.httpd.server_address[:2]
        self.url = "http://%s:%d/" % (f"[{host}]" if ":" in host else host, port)
        if thread:
            threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _take(self, path) -> Fault | None:
        for f in self.faults:
            hit = path == f.path if f.path.startswith("/") else path.endswith(f.path)
            if hit and f.times > 0:
                f.times -= 1
                return f
        return None

    def _file(self, request_path: str) -> Path | None:
        path = (self.root / request_path.split("?")[0].lstrip("/")).resolve()
        if self.root not in path.parents or not path.is_file():
            return None
        if self.only_release and (path not in _server.release_files(self.root) or _server.private_key_kind(path)):
            return None
        return path

    def _serve(self, h, f: Fault):
        if f.redirect_to is not None:
            h.send_response(302)
            h.send_header("Location", f.redirect_to)
            h.end_headers()
            return
        if f.raw_status_line is not None:
            h.wfile.write(f.raw_status_line.encode() + b"\r\n\r\n")
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
        path = self._file(h.path)
        if path is None:
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
            h.send_header("Content-Range", f.content_range or f"bytes {start}-{len(data) - 1}/{len(data)}")
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
            hold_open(h.connection, STALL_S)


def hold_open(conn, seconds: float) -> None:
    """Keep a connection open, sending nothing, until the client closes it or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([conn], [], [], 0.5)
        if ready:
            try:
                if not conn.recv(4096):
                    return
            except OSError:
                return


def serve(root: Path, faults: list[Fault], host: str, port: int, quiet: bool = False, announce=print) -> None:
    """`mpota serve DIR --fault ...`: the release in `root` with `faults`, until Ctrl-C."""
    log = None if quiet else (lambda line: sys.stderr.write(f"serve: {line}\n"))
    fs = FaultServer(Path(root), list(faults), host=host, port=port, log=log).start(thread=False)
    announce(fs)
    try:
        fs.httpd.serve_forever()
    finally:
        fs.httpd.server_close()
