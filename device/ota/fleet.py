# Sending the queued fleet reports (ota/report.py) to the fleet server: POST {fleet.url}/v1/reports,
# signed with the device's secret (HMAC-SHA256 of the body, ota/hmac.py). Run by ota.update() and
# ota.confirm() as they return, once their own modules and buffers are gone (ota._send), and only
# when the network is up. The whole exchange has one deadline, fleet.timeout_s (ota/http.py's
# limit(): connect, send and every wait for the answer stop there), and nothing is raised: a
# report the server did not acknowledge stays queued, and is sent again next time.
#
# The server's answers (docs/fleet.md):
#   200 {"ack": N}                    reports n <= N are committed: dropped from the queue
#   409 {"error": "replay", "ack": N} nothing in the batch was new (an ack we lost): the same
#   400 bad-report, 413 too-large     the server will never take this batch: dropped, counted
#   401, 404, 408, 5xx, no answer     kept for the next time
# An ack at or above our own counter means the server has seen counters we have not used yet
# (this device lost its queue files): the counter jumps past it, or every report would be a
# replay from now on.
from micropython import const
import json
from ota import ident

_BATCH = const(16)          # reports per request (the protocol's bounds)
_BODY_MAX = const(4096)
_ANSWER_MAX = const(512)    # bytes of the server's JSON answer read
_N_MAX = const(0x3FFF0000)  # as ota/report.py: counters stay small ints


def _log(msg):
    print("ota: fleet: " + msg)


def _online():
    # Wi-Fi switched on but not connected: nothing to try. Asked only of a network module the
    # application loaded (constructing a WLAN would start an ESP32's Wi-Fi driver for a board
    # on Ethernet). No network module (the unix port) or another interface: try; a network
    # that is down fails fast or times out.
    import sys
    network = sys.modules.get("network")
    if network is None:
        return True
    try:
        sta = network.WLAN(network.STA_IF)
        return not sta.active() or sta.isconnected()
    except (AttributeError, OSError):
        return True


def send(q):
    # Send the reports of the queue q (ota/report.py's Queue, just read); q.save() after.
    s = ident.settings()
    if q.new and not q.save():  # a report made now (ota/report.py, "later"): on flash before it is sent
        return
    if not q.spans or not _online():
        if q.spans:
            _log("%d report(s) queued; the network is down" % len(q.spans))
        return
    from ota import http
    from ota.errors import OtaError
    http.limit(s[2] * 1000)
    try:
        while q.spans:
            sent = q.spans[:_BATCH]
            status, ack = _post(s, q, sent)
            if status in (200, 409) and ack is not None:
                if ack >= q.h["next"]:
                    q.h["next"] = ack + 1
                before = len(q.spans)
                q.drop(ack, False)
                q.h["ack"] = max(ack, q.h["ack"])
                q.h["dropped"] = 0
                if not q.save() or len(q.spans) == before:
                    break  # nothing was taken: not again in this call
            elif status in (400, 413):
                _log("the server refused %d report(s) for good (%d); dropped" % (len(sent), status))
                q.drop(sent[-1][0], True)
                if not q.save():
                    break
            else:
                _log("%d report(s) kept: the server answered %d" % (len(q.spans), status))
                break
    except (OtaError, OSError) as e:
        why = "%s (%s)" % (e.code, e.detail) if isinstance(e, OtaError) else repr(e)
        _log("%d report(s) kept: %s" % (len(q.spans), why))
    finally:
        http.limit(None)


def _post(s, q, sent):
    # One signed POST of the reports `sent` (spans of the queue's file); (status, ack or None).
    # The body is streamed from the file twice, never held: for the HMAC, then to the server.
    from ota import http
    from ota.hmac import HMAC
    from binascii import hexlify
    url, secret, timeout_s, did = s[0], s[1], s[2], s[3]
    # {"device":"<id>","reports":[<line>,<line>]}
    head = ('{"device":"%s","reports":[' % did).encode()
    n = len(head) + 2 + sent[-1][2] - sent[0][1]
    while n > _BODY_MAX and len(sent) > 1:
        x = sent.pop()
        n -= x[2] - x[1] + 1
    mac = HMAC(secret, head)
    q.body(sent, mac.update)
    mac.update(b"]}")
    sig = hexlify(mac.digest()).decode()
    mac = None
    tls, host, port, path = http.split_url(url + "/v1/reports")
    ca = None
    if tls:
        with open(s[6], "rb") as f:
            ca = f.read(4097)
    c = http._connect(tls, host, port, timeout_s, ca)
    try:
        dl = http.deadline(timeout_s)  # and never past the whole exchange's (http.limit)
        c.send(("POST %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: mpota/%s\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\nX-Mpota-Device: %s\r\nX-Mpota-Signature: %s\r\nConnection: close\r\n\r\n"
                % (path, host, ident.AGENT, n, did, sig)).encode() + head, dl)
        q.body(sent, lambda piece: c.send(piece, dl))
        c.send(b"]}", dl)
        return _answer(c, timeout_s, q.buf)
    except OSError as e:
        raise http._err("network", "%s: %r" % (host, e))
    finally:
        c.close()


def _answer(c, timeout_s, buf):
    # The status and the "ack" of the server's JSON answer (headers skipped, at most 48 lines of
    # at most 512 bytes; the body read up to 512 bytes: anything longer is not an answer of ours).
    from ota import http
    import time
    dl = time.ticks_add(time.ticks_ms(), timeout_s * 1000)
    line = http._readline(c, buf, dl)
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise http._err("bad-response", "bad status line %r" % line[:40])
    status = int(parts[1])
    length = min(len(buf), _ANSWER_MAX)
    for _ in range(48):
        line = http._readline(c, buf, dl)
        if not line:
            break
        if line[:15].lower() == b"content-length:":
            try:
                length = min(int(line[15:]), length)  # a server that keeps the connection open
            except ValueError:
                pass
    else:
        raise http._err("bad-response", "too many header lines")
    mv = memoryview(buf)
    got = 0
    while got < length:
        k = c.readinto(mv[got:length], dl)
        if not k:
            break
        got += k
    ack = None
    try:
        a = json.loads(bytes(mv[:got])).get("ack")
        if isinstance(a, int) and 0 <= a < _N_MAX:
            ack = a
    except (ValueError, AttributeError):
        pass
    return status, ack
