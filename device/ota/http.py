# A small, bounded HTTP/1.0 GET client for the agent: the request (connection, TLS, request,
# status line, headers, redirects). The response's body and every wait's deadlines are
# ota/body.py's, which a download keeps while this module is forgotten (body.get()).
#
# Why not micropython-lib `requests` (which design.md names): it reads header lines with an
# unbounded readline(), follows redirects by unbounded recursion, and keeps every header; a
# hostile or broken server can exhaust the heap or the stack with it. Here every line, header
# count and redirect chain is bounded, a stalled server hits a per-read timeout and a
# per-block deadline, and every failure maps to one transport error code. TLS uses the
# firmware's `tls` (or `ssl`) module with certificate verification always on.
from micropython import const
import socket
import time
from ota.errors import OtaError, DEVICE
from ota.body import _err, _wait_ms, _Conn, Response, deadline, limit, read_full  # noqa: F401 (this module's API too)
from ota.url import split_url, join  # noqa: F401 (this module's API too)

_LINE_MAX = const(512)
_HEADERS_MAX = const(48)
_REDIRECTS_MAX = const(3)
_KEEP = ("content-length", "content-range", "location", "retry-after", "transfer-encoding",
         "content-encoding", "etag")


def _readline(s, buf, deadline_ms):
    # One header line, at most _LINE_MAX bytes, byte by byte (headers are a few hundred
    # bytes; reading exactly to the end of the headers leaves the body for readinto).
    n = 0
    one = bytearray(1)
    while True:
        if not s.readinto(one, deadline_ms):
            raise _err("bad-response", "connection closed in the headers")
        c = one[0]
        if c == 10:
            break
        if n == _LINE_MAX:
            raise _err("bad-response", "header line longer than %d bytes" % _LINE_MAX)
        buf[n] = c
        n += 1
    if n and buf[n - 1] == 13:
        n -= 1
    return bytes(buf[:n])


def _connect(tls, host, port, timeout_s, ca):
    try:
        ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        s = socket.socket(ai[0], socket.SOCK_STREAM, ai[2])
    except OSError as e:
        raise _err("network", "cannot resolve %s: %r" % (host, e))
    try:
        wait = _wait_ms(timeout_s * 1000, None)  # not past the whole call's deadline
    except OtaError:
        s.close()
        raise
    try:
        s.settimeout(max(1, wait // 1000))
        s.connect(ai[-1])  # bounded by the socket timeout
        s.setblocking(False)
        if tls:
            if ca is None:
                raise OtaError("bad-config", "https needs a CA certificate (\"ca\" in ota_config.json)", DEVICE)
            try:
                import tls  # v1.23+: the C module; cadata is its only (positional) argument
                ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)
                ctx.load_verify_locations(ca)
            except ImportError:
                import ssl  # older firmware: CPython-style keywords
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_verify_locations(cadata=ca)
            ctx.verify_mode = 2  # CERT_REQUIRED: the server must chain to the provisioned CA
            # The handshake runs inside our first (non-blocking, polled) write: _Conn.send.
            s = ctx.wrap_socket(s, server_hostname=host, do_handshake_on_connect=False)
    except (OSError, ValueError) as e:  # ValueError: a CA file that is not a certificate
        s.close()
        raise _err("network", "cannot connect to %s:%d: %r" % (host, port, e))
    return _Conn(s, timeout_s, "%s:%d" % (host, port))


def get(url, timeout_s, start=0, ca=None, agent=None, scratch=None):
    # GET `url` (from byte `start` with a Range request). Returns a Response with status 200
    # or 206; redirects are followed (at most 3); anything else raises a transport OtaError
    # (with .retry_after set from a 503/429 Retry-After header). agent: (query, User-Agent) of
    # a device that names itself ("announce", ota/ident.py), or None. scratch: a buffer of at
    # least 512 bytes that is free until the body is read (the update's block buffer), for the
    # header lines; else one is allocated.
    if url.startswith("serial:"):
        from ota import link
        return link.get(url, timeout_s, start)
    if agent:
        url += ("&" if "?" in url else "?") + agent[0]
    for hop in range(_REDIRECTS_MAX + 1):
        try:
            tls, host, port, path = split_url(url)
        except ValueError:
            if hop:  # the server's Location header, not our configuration
                raise _err("bad-response", "redirect to a URL we cannot use: %r" % url[:80])
            raise OtaError("bad-url", "cannot use URL %r" % url[:80], DEVICE)
        s = _connect(tls, host, port, timeout_s, ca)
        req = "GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: %s\r\nConnection: close\r\n" % (
            path, host, agent[1] if agent else "mpota")
        if start:
            req += "Range: bytes=%d-\r\n" % start
        try:
            # connect, TLS handshake and request within 2 x timeout_s; the headers within one more
            s.send(req.encode() + b"\r\n", deadline(timeout_s))
            dl = time.ticks_add(time.ticks_ms(), timeout_s * 1000)
            buf = scratch if scratch is not None else bytearray(_LINE_MAX)
            line = _readline(s, buf, dl)
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit() or len(parts[1]) != 3:
                raise _err("bad-response", "bad status line %r" % line[:40])
            status = int(parts[1])  # three digits: the error code built from it stays "http-NNN"
            headers = {}
            for _ in range(_HEADERS_MAX):
                line = _readline(s, buf, dl)
                if not line:
                    break
                i = line.find(b":")
                if i > 0:
                    k = line[:i].strip().lower().decode()
                    if k in _KEEP:
                        headers[k] = line[i + 1:].strip()[:200].decode()
            else:
                raise _err("bad-response", "more than %d header lines" % _HEADERS_MAX)
        except OSError as e:
            s.close()
            raise _err("network", "%s: %r" % (url[:80], e))
        except (OtaError, UnicodeError, ValueError) as e:
            s.close()
            if isinstance(e, OtaError):
                raise
            raise _err("bad-response", "malformed response from %s" % url[:80])
        if status in (301, 302, 303, 307, 308) and "location" in headers:
            s.close()
            url = join(url, headers["location"])
            if tls and not url.startswith("https://"):
                raise _err("bad-response", "redirect from https to %r refused" % url[:80])
            continue
        if "transfer-encoding" in headers or "content-encoding" in headers:
            s.close()
            raise _err("bad-response", "encoded response (%s); serve the files as they are"
                       % (headers.get("transfer-encoding") or headers.get("content-encoding")))
        if status == 200 or status == 206:
            return Response(s, status, headers, timeout_s)
        s.close()
        e = _err("http-%d" % status, "GET %s answered %d" % (url[:80], status))
        e.retry_after = _retry_after(headers.get("retry-after"))
        raise e
    raise _err("redirect-loop", "more than %d redirects from %s" % (_REDIRECTS_MAX, url[:80]))


def _retry_after(v):
    # Seconds from a Retry-After header (the delay form; an HTTP date gives the default).
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        return 60
    return n if 0 <= n <= 86400 else 86400
