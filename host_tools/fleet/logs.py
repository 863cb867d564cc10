"""Web server logs as fleet reports: devices with `"announce": true` name themselves in every
manifest fetch (User-Agent `mpota/AGENT (d=ID; v=VERSION; r=EVENT[:CODE])` and the query string
`?d=ID&v=VERSION&r=EVENT[:CODE]`), so the access log of any static server or CDN is an
inventory. This reads Common and Combined Log Format lines (Apache, nginx, most CDNs' exports).
No I/O but the lines given.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import parse_qs, urlsplit

from . import protocol

_Q = r'"((?:[^"\\]|\\.)*)"'
_LINE = re.compile(r'^(\S+) (\S+) (\S+) \[([^\]]+)\] ' + _Q + r' (\d{3}|-) (\S+)(?: ' + _Q + ' ' + _Q + r')?')
_UA = re.compile(r"mpota/(\S+) \(([^)]*)\)")


@dataclass
class Result:
    items: list = field(default_factory=list)   # [(time, announce, line)] for storage.import_announces
    lines: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count

    def skip(self, why: str):
        self.skipped[why] = self.skipped.get(why, 0) + 1


def _unescape(s: str) -> str:
    return s.replace('\\"', '"').replace("\\\\", "\\")


def _from_ua(ua: str) -> dict:
    m = _UA.search(ua or "")
    if not m:
        return {}
    out = {"agent": m.group(1)}
    for part in m.group(2).split(";"):
        k, _, v = part.strip().partition("=")
        if k in ("d", "v", "r") and v:
            out[k] = v.strip()
    return out


def parse_line(line: str):
    """(time, announce) for a line of a device naming itself; else (None, reason)."""
    m = _LINE.match(line)
    if not m:
        return None, "not Common/Combined Log Format"
    client, _, _, when, request, status, _size, _referer, ua = m.groups()
    try:
        at = datetime.strptime(when, "%d/%b/%Y:%H:%M:%S %z").timestamp()
    except ValueError:
        return None, "bad time"
    method, _, rest = _unescape(request).partition(" ")
    target = rest.rsplit(" ", 1)[0] if " " in rest else rest
    q = {k: v[0] for k, v in parse_qs(urlsplit(target).query).items() if k in ("d", "v", "r")}
    fields = {**_from_ua(_unescape(ua or "")), **q}  # the query string wins where both say
    device = fields.get("d")
    if device is None:
        return None, "no device named"
    if not protocol.valid_device_id(device):
        return None, "bad device id"
    version = fields.get("v")
    if version is not None and not (1 <= len(version) <= protocol.MAX_TEXT and version.isprintable()):
        version = None
    result = fields.get("r")
    code = None
    if result is not None:
        ev, _, code = result.partition(":")
        if ev not in protocol.EVENTS or len(code) > protocol.MAX_TEXT or not code.isprintable():
            result, code = None, None
        code = code or None
    path = urlsplit(target).path
    detail = f"{method} {path} {status} from {client}"[:protocol.MAX_DETAIL]
    return at, {"device": device, "version": version, "result": result, "code": code, "detail": detail}


def parse(lines) -> Result:
    res = Result()
    for line in lines:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        res.lines += 1
        at, rep = parse_line(line)
        if at is None:
            res.skip(rep)
            continue
        res.items.append((at, rep, line))
    return res
