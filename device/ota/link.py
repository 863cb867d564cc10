# A release pushed over the serial link (`mpota push RELEASE --port PORT`): the transport for
# the source "serial:", with the same interface as ota.http (get() -> a response with status,
# headers, length, readinto(mv) held to a minimum rate, close()), so the manifest and the payload go
# through the same verified pipeline as over HTTP: signature, hashes, resume, set_boot, rollback.
#
# The host drives the REPL (raw mode) and answers the requests we print on stdout, each on one
# line after the marker \x1e"MPOTA ":
#   GET <path> <start>   -> the host answers one line "<status> <length>" (206 from a start > 0)
#   READ <n>             -> the host sends exactly n bytes of that file, nothing else
#   CLOSE                -> the host closes the file
# We ask for at most one buffer at a time and read it at once, so a UART without flow control
# never has more in flight than we are reading. Ctrl-C is switched off meanwhile (binary data
# may contain 0x03); ota.update() switches it back on. Every wait has the timeouts of ota.body.
import sys
import select
import time
from ota.errors import OtaError, TRANSPORT

_MARK = "\x1eMPOTA "
_PIECE = 64  # bytes read per stdin readinto() once poll() says data is there


def _err(code, detail):
    return OtaError(code, detail, TRANSPORT)


class _In:
    def __init__(self, timeout_s):
        self.ms = timeout_s * 1000
        self.poller = select.poll()
        self.poller.register(sys.stdin, select.POLLIN)
        self.stream = sys.stdin.buffer

    def fill(self, mv, deadline_ms):
        from ota.body import _wait_ms
        n = 0
        while n < len(mv):
            if not self.poller.poll(_wait_ms(self.ms, deadline_ms)):
                _wait_ms(self.ms, deadline_ms)  # raises if a deadline passed meanwhile
                raise _err("network", "no data from the host for %d s" % (self.ms // 1000))
            k = self.stream.readinto(mv[n:n + min(_PIECE, len(mv) - n)])
            if not k:
                raise _err("network", "the serial link closed")
            n += k
        return n


def _ask(line):
    sys.stdout.write(_MARK + line + "\n")


class Response:
    def __init__(self, src, status, length, start, timeout_s):
        self.src = src
        self.status = status
        self.length = length
        self.left = length
        self.headers = {"content-range": "bytes %d-" % start} if status == 206 else {}
        self.timeout_s = timeout_s
        self.t0 = time.ticks_ms()
        self.got = 0

    def readinto(self, mv):
        # held to the same minimum rate as an HTTP body (ota.body.rate_deadline)
        from ota.body import rate_deadline
        n = min(len(mv), self.left)
        if not n:
            return 0
        _ask("READ %d" % n)
        self.src.fill(mv[:n], rate_deadline(self.t0, self.got, self.timeout_s))
        self.left -= n
        self.got += n
        return n

    def close(self):
        _ask("CLOSE")


def get(url, timeout_s, start=0, ca=None):
    import micropython
    micropython.kbd_intr(-1)
    src = _In(timeout_s)
    _ask("GET %s %d" % (url[7:], start))
    line = bytearray(32)
    one = memoryview(bytearray(1))
    n = 0
    dl = time.ticks_add(time.ticks_ms(), timeout_s * 1000)
    while True:
        src.fill(one, dl)
        if one[0] == 10:
            break
        if n == len(line):
            raise _err("bad-response", "the host's answer is too long")
        line[n] = one[0]
        n += 1
    parts = bytes(line[:n]).split()
    if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise _err("bad-response", "the host answered %r" % bytes(line[:n]))
    status = int(parts[0])
    if status not in (200, 206):
        raise _err("http-%d" % status, "the host has no %s (%d)" % (url[7:][:60], status))
    return Response(src, status, int(parts[1]), start, timeout_s)
