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


# The whole update() call has a deadline too (set by the updater, from the config): no wait of
# any kind goes past it. A ticks_ms value or None, kept on the package: this module is dropped
# and loaded again in the payload stage (ota/__init__.py runs the stages as two calls).
import ota


def limit(ms):
    # Set the deadline of everything that follows to `ms` from now (None: no deadline).
    ota._until = None if ms is None else time.ticks_add(time.ticks_ms(), ms)


def _wait_ms(timeout_ms, deadline_ms):
    # How long the next poll may wait: at most timeout_ms, never past deadline_ms or the whole
    # call's deadline. Raises too-slow when one of them has passed.
    wait = timeout_ms
    until = getattr(ota, "_until", None)
    for dl, what in ((deadline_ms, "the server sends too slowly"), (until, "the update ran out of time")):
        if dl is not None:
            left = time.ticks_diff(dl, time.ticks_ms())
            if left <= 0:
                raise _err("too-slow", what)
            wait = min(wait, left)
    return wait


class _Conn:
    # A connected socket (TLS included) used without ever blocking past a deadline. A blocking
    # readinto() in MicroPython waits until the whole buffer is full, so a server trickling one
    # byte per second would hold it for hours, and a blocking TLS handshake has only a per-read
    # timeout: a peer that trickles it, or floods alerts, holds it for ever. So the socket is
    # non-blocking, the TLS handshake runs inside the first write, and we poll() with deadlines.
    def __init__(self, sock, timeout_s, where):
        self.sock = sock
        self.where = where  # "host:port", for messages
        self.timeout_ms = timeout_s * 1000
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)

    def _wait(self, deadline_ms, what, mask=select.POLLIN):
        # mask: POLLIN to read; to send, also POLLOUT (a TLS handshake reads and writes)
        self.poller.modify(self.sock, mask)
        if not self.poller.poll(_wait_ms(self.timeout_ms, deadline_ms)):
            _wait_ms(self.timeout_ms, deadline_ms)  # raises if a deadline passed meanwhile
            raise _err("network", "%s: nothing for %d s (stalled)" % (what, self.timeout_ms // 1000))

    def send(self, data, deadline_ms):
        # All of `data`, the TLS handshake first if there is one, before deadline_ms.
        mv = memoryview(data)
        while mv:
            try:
                n = self.sock.write(mv)
            except (OSError, ValueError) as e:  # ValueError: the server's certificate (mbedtls)
                raise _err("network", "cannot connect to %s: %r" % (self.where, e))
            if n is None:
                self._wait(deadline_ms, "connection", select.POLLIN | select.POLLOUT)
                continue
            mv = mv[n:]

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
            self._wait(deadline_ms, "server")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def rate_deadline(t0, got, timeout_s):
    # The minimum rate every body is held to, whatever the reads' sizes: 4 KiB per 2 x timeout_s
    # on average since the response began (got bytes so far; t0 its ticks_ms). A server that
    # stops altogether is "network" after timeout_s; one that trickles is "too-slow".
    return time.ticks_add(t0, (got // 4096 + 1) * timeout_s * 2000)


class Response:
    # status, headers (lower-case names, only those in _KEEP), length (Content-Length or
    # None); read the body with readinto() until it returns 0, held to rate_deadline().
    def __init__(self, sock, status, headers, timeout_s):
        self.sock = sock
        self.status = status
        self.headers = headers
        self.timeout_s = timeout_s
        self.t0 = time.ticks_ms()
        self.got = 0
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

    def readinto(self, mv):
        n = self.sock.readinto(mv, rate_deadline(self.t0, self.got, self.timeout_s))
        self.got += n
        return n

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


def get(url, timeout_s, start=0, ca=None, agent=None):
    # GET `url` (from byte `start` with a Range request). Returns a Response with status 200
    # or 206; redirects are followed (at most 3); anything else raises a transport OtaError
    # (with .retry_after set from a 503/429 Retry-After header). agent: (query, User-Agent) of
    # a device that names itself ("announce", ota/ident.py), or None.
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
            buf = bytearray(_LINE_MAX)
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


def deadline(timeout_s):
    # Twice the idle timeout from now: for a connection's set-up (connect, TLS handshake,
    # request), so that a peer that stops altogether is "network", one that trickles "too-slow".
    return time.ticks_add(time.ticks_ms(), timeout_s * 2000)


def read_full(resp, mv):
    # Fill `mv` from the body; returns how many bytes came before the body ended. The
    # response holds every read to its minimum rate (rate_deadline), whatever the sizes.
    n = 0
    want = len(mv)
    while n < want:
        k = resp.readinto(mv[n:])
        if not k:
            break
        n += k
    return n
