# The body of an HTTP response, and the deadlines every wait of the agent keeps: the part of
# the HTTP client a download runs on. The request (ota/http.py: connection, TLS, request,
# status line, headers, redirects) is loaded only while a response is opened (get() below) and
# forgotten once its headers are read, so a payload's download does not carry its code.
import select
import time
from micropython import const
import ota
from ota.errors import OtaError, TRANSPORT

# Transport failures worth an immediate reconnect with Range (the link broke mid-body), and
# how many such reconnects one update() makes (see resume()).
RESUMABLE = ("network", "truncated", "too-slow")
RETRIES = const(3)


def _err(code, detail):
    return OtaError(code, detail, TRANSPORT)


def get(url, timeout_s, start, ca, scratch):
    # ota.http.get(), with the request's code loaded for it alone (ota/raw.py, ota/payload.py:
    # each reconnect of a download loads it again, for a few ms); scratch: the block buffer,
    # free until the body is read, for the header lines.
    from ota import http
    try:
        return http.get(url, timeout_s, start, ca, None, scratch)
    finally:
        http = None
        ota._drop(("ota.http", "ota.url"))


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
# any kind goes past it. A ticks_ms value or None, kept on the package as ota._until: this
# module is dropped and loaded again in the payload stage (ota/__init__.py runs the stages as
# two calls).
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
