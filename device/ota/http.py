# A small, bounded HTTP/1.0 GET client for the agent.
#
# Why not micropython-lib `requests` (which design.md names): it reads header lines with an
# unbounded readline(), follows redirects by unbounded recursion, and keeps every header; a
# hostile or broken server can exhaust the heap or the stack with it. Here every line, header
# count and redirect chain is bounded, a stalled server hits a per-read timeout and a
# per-block deadline, and every failure maps to one transport error code. TLS uses the
# firmware's `tls` (or `ssl`) module with certificate verification always on.
from micropython import const
import select
import socket
import time
from ota.errors import OtaError, TRANSPORT, DEVICE

_LINE_MAX = const(512)
_HEADERS_MAX = const(48)
_REDIRECTS_MAX = const(3)
# Transport failures worth an immediate reconnect with Range (the link broke mid-body), and
# how many such reconnects one update() makes (see resume()).
RESUMABLE = ("network", "truncated", "too-slow")
RETRIES = const(3)
_KEEP = ("content-length", "content-range", "location", "retry-after", "transfer-encoding",
         "content-encoding", "etag")


def _err(code, detail):
    return OtaError(code, detail, TRANSPORT)


def resume(step, where):
    # Run a download that survives a broken link: step() fetches from wherever the previous
    # call got to (a Range request) and returns when everything has arrived. A RESUMABLE
    # failure is retried up to RETRIES times; any other failure, or one too many, is raised
    # (step has kept its position for the next update()). where() says how far it got.
    tries = 0
    while True:
        try:
            return step()
        except OtaError as e:
            if e.code not in RESUMABLE or tries >= RETRIES:
                raise
            tries += 1
            print("ota: %s at %s; reconnecting (%d/%d)" % (e.code, where(), tries, RETRIES))


class _Conn:
    # A connected socket read without ever blocking past a deadline. A blocking readinto()
    # in MicroPython waits until the whole buffer is full, so a server trickling one byte
    # per second would hold it for hours; instead the socket is non-blocking and we poll().
    def __init__(self, sock, timeout_s):
        self.sock = sock
        self.timeout_ms = timeout_s * 1000
        sock.setblocking(False)
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)

    def readinto(self, mv, deadline_ms=None):
        # Some bytes (at least 1), or 0 at the end of the stream. "network" when nothing
        # arrives for timeout_s; "too-slow" when deadline_ms passes first.
        while True:
            try:
                n = self.sock.readinto(mv)
            except OSError as e:
                raise _err("network", "receive failed: %r" % (e,))
            if n is not None:
                return n
            wait = self.timeout_ms
            if deadline_ms is not None:
                left = time.ticks_diff(deadline_ms, time.ticks_ms())
                if left <= 0:
                    raise _err("too-slow", "the server sends too slowly (under 4 KiB per %d s)"
                               % (2 * self.timeout_ms // 1000))
                wait = min(wait, left)
            if not self.poller.poll(wait):
                if deadline_ms is not None and time.ticks_diff(deadline_ms, time.ticks_ms()) <= 0:
                    continue  # reported as too-slow above
                raise _err("network", "no data for %d s (server stalled)" % (self.timeout_ms // 1000))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Response:
    # status, headers (lower-case names, only those in _KEEP), length (Content-Length or
    # None); read the body with readinto() until it returns 0.
    def __init__(self, sock, status, headers):
        self.sock = sock
        self.status = status
        self.headers = headers
        self.length = None
        v = headers.get("content-length")
        if v is not None:
            try:
                self.length = int(v)
            except ValueError:
                self.length = -1
            if self.length < 0:
                self.close()
                raise _err("bad-response", "Content-Length %r" % v)

    def readinto(self, mv, deadline_ms=None):
        return self.sock.readinto(mv, deadline_ms)

    def close(self):
        self.sock.close()


def split_url(url):
    # "http://host:port/path" -> (https?, host, port, "/path"); ValueError if malformed.
    if url.startswith("http://"):
        tls, rest, port = False, url[7:], 80
    elif url.startswith("https://"):
        tls, rest, port = True, url[8:], 443
    else:
        raise ValueError(url)
    i = rest.find("/")
    hostport, path = (rest, "/") if i < 0 else (rest[:i], rest[i:])
    if ":" in hostport:
        host, p = hostport.rsplit(":", 1)
        port = int(p)
    else:
        host = hostport
    if not host or not 0 < port < 65536 or " " in path or "\r" in path or "\n" in path:
        raise ValueError(url)
    return tls, host, port, path


def join(base, ref):
    # A Location or payload URL relative to `base`. A URL with a scheme ("ftp://...") is
    # absolute: returned as it is, for split_url to refuse.
    i = ref.find("://")
    if i > 0 and "/" not in ref[:i]:
        return ref
    if base.startswith("serial:"):  # a release pushed over the serial link (ota/link.py)
        return base[:base.rfind("/") + 1] + ref
    tls, host, port, path = split_url(base)
    root = ("https://" if tls else "http://") + host + ":" + str(port)
    if ref.startswith("/"):
        return root + ref
    return root + path[:path.rfind("/") + 1] + ref


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
        s.settimeout(timeout_s)
        s.connect(ai[-1])
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
            s = ctx.wrap_socket(s, server_hostname=host)
    except (OSError, ValueError) as e:  # ValueError: a CA file that is not a certificate
        s.close()
        raise _err("network", "cannot connect to %s:%d: %r" % (host, port, e))
    return s


def _send(s, data):
    try:
        s.write(data)
    except OSError as e:
        s.close()
        raise _err("network", "send failed: %r" % (e,))


def get(url, timeout_s, start=0, ca=None):
    # GET `url` (from byte `start` with a Range request). Returns a Response with status 200
    # or 206; redirects are followed (at most 3); anything else raises a transport OtaError
    # (with .retry_after set from a 503/429 Retry-After header).
    if url.startswith("serial:"):
        from ota import link
        return link.get(url, timeout_s, start)
    for hop in range(_REDIRECTS_MAX + 1):
        try:
            tls, host, port, path = split_url(url)
        except ValueError:
            if hop:  # the server's Location header, not our configuration
                raise _err("bad-response", "redirect to a URL we cannot use: %r" % url[:80])
            raise OtaError("bad-url", "cannot use URL %r" % url[:80], DEVICE)
        s = _connect(tls, host, port, timeout_s, ca)
        req = "GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: mpota\r\nConnection: close\r\n" % (path, host)
        if start:
            req += "Range: bytes=%d-\r\n" % start
        _send(s, req.encode() + b"\r\n")
        s = _Conn(s, timeout_s)
        dl = deadline(timeout_s)  # all the headers within one timeout
        try:
            buf = bytearray(_LINE_MAX)
            line = _readline(s, buf, dl)
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                raise _err("bad-response", "bad status line %r" % line[:40])
            status = int(parts[1])
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
            continue
        if "transfer-encoding" in headers or "content-encoding" in headers:
            s.close()
            raise _err("bad-response", "encoded response (%s); serve the files as they are"
                       % (headers.get("transfer-encoding") or headers.get("content-encoding")))
        if status == 200 or status == 206:
            return Response(s, status, headers)
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


def deadline(timeout_s):
    # A ticks_ms deadline for one buffer (a 4 KiB block at most): a minimum transfer rate that
    # a trickling server cannot dodge. Twice the idle timeout, so that a server that stops
    # sending altogether is reported as stalled ("network"), one that trickles as "too-slow".
    return time.ticks_add(time.ticks_ms(), timeout_s * 2000)


def read_full(resp, mv, deadline_ms):
    # Fill `mv` from the body; returns how many bytes came before the body ended. A server
    # that trickles bytes to dodge the socket timeout still has to beat `deadline_ms` (a
    # ticks_ms value) for the whole buffer: a minimum transfer rate.
    n = 0
    want = len(mv)
    while n < want:
        k = resp.readinto(mv[n:], deadline_ms)
        if not k:
            break
        n += k
    return n
