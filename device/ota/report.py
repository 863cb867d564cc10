# Fleet reports (docs/fleet.md, "Device side"): every event the agent records becomes a report
# for the fleet server, queued here in a bounded file and sent by ota/fleet.py at the end of
# ota.update() and ota.confirm(). Loaded only when a device has a fleet server and a hook asks
# (ota._report), and forgotten after; nothing here loads the HTTP stack.
#
# The queue is two copies, ota_reports.0 and ota_reports.1, written in turn like the agent's
# state (ota/state.py): a save writes the older copy, so a power cut while it is written (torn on
# FAT; LittleFS keeps the old content of a file not closed) leaves the newer one whole. Never
# renamed (on FAT a rename over a file is a remove, then a rename). Each copy, at most 4096 bytes:
#   {"gen": 9, "next": 14, "ack": 11, "dropped": 0, "boots": 6, "rel": [...], "later": null}
#   {"n":12,"event":"checked",...,"dropped":0}       one report per line, as it is sent
#   {"n":13,"event":"downloading",...,"dropped":0}
#   1c9a0e3f                                         CRC-32 of all the lines above
#   next     the counter of the next report. It is written in the same write as the report that
#            takes it, and reports leave the device only from a copy on flash (fleet.py), so no
#            counter is ever sent twice for two reports, whatever the power does
#   ack      the highest counter the server acknowledged (the server's answer, for the record)
#   dropped  reports dropped (the oldest first) since the last acknowledgement: a report carries
#            the count as it was queued, so the server knows what it will never see
#   boots    starts of the agent counted (one per start that ran the report code)
#   rel      [agent digest, envelope digest] of the release last offered: the agent keys a
#            release by its manifest body's SHA-256, the protocol by its envelope's
#   later    a report the image on trial leaves for the one that comes back after a failed
#            health check: a rollback is reported by the image that came back (ota/trial.py)
#
# Memory: the queue is never held in RAM. It is read and copied through a small scratch buffer
# (512 bytes, or the update's 4 KiB block buffer, free when update() queues its reports): a
# copy is checked (CRC) and its lines found in one pass, and a save copies the lines it keeps
# from one file to the other. A report is built as one string of at most 400 bytes.
from micropython import const
import os
import json
from binascii import crc32
from ota import ident

PATHS = ("ota_reports.0", "ota_reports.1")
_MAX = const(4096)        # bytes per copy of the queue
_LINE_MAX = const(400)    # bytes per report
_LINES_MAX = const(48)    # lines a copy of at most 4096 bytes can hold (more: not ours)
_HEAD_MAX = const(1024)   # bytes of the header line
_DETAIL_MAX = const(160)  # characters of detail (the protocol's bound)
_SCRATCH = const(512)     # also holds a line of the server's answer (ota/fleet.py)
_N_MAX = const(0x3FFF0000)  # counters stay small ints (31 bits on an ESP32)
_INTS = ("gen", "next", "ack", "dropped", "boots")


def _fresh():
    return {"gen": 0, "next": 1, "ack": 0, "dropped": 0, "boots": 0, "rel": None, "later": None}


def _scan(path, buf):
    # (header, spans) of one copy, or None if it is missing, torn or not ours. spans: [(n,
    # start, end)] of each report line in the file, oldest first (end: the offset of its
    # newline). Streams the file through `buf`.
    try:
        size = os.stat(path)[6]
    except OSError:
        return None
    if not 10 <= size <= _MAX:
        return None
    body = size - 8  # then the CRC-32 of everything before it, 8 hex digits
    mv = memoryview(buf)
    ends = []  # offsets of the newlines
    crc = 0
    try:
        with open(path, "rb") as f:
            pos = 0
            while pos < body:
                k = f.readinto(mv[:min(len(buf), body - pos)])
                if not k:
                    return None
                crc = crc32(mv[:k], crc)
                i = buf.find(b"\n", 0, k)
                while i >= 0:
                    if len(ends) == _LINES_MAX:
                        return None
                    ends.append(pos + i)
                    i = buf.find(b"\n", i + 1, k)
                pos += k
            if f.readinto(mv[:8]) != 8 or int(bytes(mv[:8]), 16) != crc & 0xFFFFFFFF:
                return None
            if not ends or ends[-1] != body - 1 or ends[0] > _HEAD_MAX:
                return None
            f.seek(0)
            head = bytearray(ends[0])
            f.readinto(head)
            h = json.loads(bytes(head))
            head = None
            for k in _INTS:
                if not isinstance(h.get(k), int) or not 0 <= h[k] <= _N_MAX:
                    return None
            spans = []
            for j in range(1, len(ends)):
                # every line starts {"n":<digits>,
                f.seek(ends[j - 1] + 1)
                k = f.readinto(mv[:16])
                c = buf.find(b",", 5, k)
                if c < 0 or bytes(mv[:5]) != b'{"n":':
                    return None
                spans.append((int(bytes(mv[5:c])), ends[j - 1] + 1, ends[j]))
    except (OSError, ValueError, AttributeError):
        return None
    for k, n in (("rel", 2), ("later", 5)):
        if not (isinstance(h.get(k), list) and len(h[k]) == n):
            h[k] = None
    return h, spans


def _put(f, piece, crc):
    f.write(piece)
    return crc32(piece, crc)


class Queue:
    # The newer intact copy: h (its header), path (its file, None for an empty queue), spans
    # (its reports), and the reports this call adds (new: each line without its "dropped"
    # value, set when written). buf: the scratch buffer to stream the files through.
    def __init__(self, buf=None):
        self.buf = buf if buf is not None else bytearray(_SCRATCH)
        self.h, self.path, self.spans = _fresh(), None, []
        for path in PATHS:
            got = _scan(path, self.buf)
            if got is not None and got[0]["gen"] > self.h["gen"]:
                self.h, self.spans = got
                self.path = path
        self.new = []
        self.dirty = False
        import ota
        if not getattr(ota, "_booted", 0):
            # The first report of this start: count it, and make the report the image before us
            # left for whoever came back (ota/trial.py: a failed health check, then a reset).
            ota._booted = 1
            self.h["boots"] += 1
            self.dirty = True
            later = self.h["later"]
            if later:
                self.h["later"] = None
                self.add(*later)

    def env(self, digest):
        # the envelope digest of the release the agent calls `digest`, if we saw it offered
        rel = self.h["rel"]
        return rel[1] if digest and rel and rel[0] == digest else None

    def add(self, event, code=None, detail=None, target=None, digest=None):
        n = self.h["next"]
        if n >= _N_MAX:
            return
        self.h["next"] = n + 1
        self.new.append(_line(n, event, code, detail, target, digest, self.h["boots"]))
        self.dirty = True

    def drop(self, upto, counted):
        # forget the reports with n <= upto (acknowledged, or refused for good: counted)
        keep = [s for s in self.spans if s[0] > upto]
        if counted:
            self.h["dropped"] += len(self.spans) - len(keep)
        self.spans = keep
        self.dirty = True

    def save(self):
        # Write the older copy (see the top). Reports that do not fit go, the oldest first,
        # counted in "dropped". Returns False if the filesystem refused (nothing raised: a report
        # is not worth an application); the queue then stays as it was on flash.
        if not self.dirty:
            return True
        h = self.h
        h["gen"] += 1
        if PATHS[h["gen"] % 2] == self.path:  # a copy not of our making: never write over what we read
            h["gen"] += 1
        keep = self.spans
        while True:
            head = json.dumps(h).encode()
            lines = [p + b"%d}" % h["dropped"] for p in self.new]
            size = len(head) + 9 + sum(s[2] - s[1] + 1 for s in keep) + sum(len(x) + 1 for x in lines)
            if size <= _MAX or not keep and len(self.new) < 2:
                break
            if keep:
                keep = keep[1:]
            else:
                self.new.pop(0)
            h["dropped"] += 1
        path = PATHS[h["gen"] % 2]
        mv = memoryview(self.buf)
        try:
            with open(path, "wb") as f:
                c = _put(f, head + b"\n", 0)
                head = None
                if keep:
                    # the lines kept, as they are: one range of the other copy
                    with open(self.path, "rb") as g:
                        g.seek(keep[0][1])
                        left = keep[-1][2] + 1 - keep[0][1]
                        while left:
                            k = g.readinto(mv[:min(len(mv), left)])
                            if not k:
                                raise OSError(5)
                            c = _put(f, mv[:k], c)
                            left -= k
                for x in lines:
                    c = _put(f, x, c)
                    c = _put(f, b"\n", c)
                f.write(b"%08x" % (c & 0xFFFFFFFF))
        except OSError as e:
            print("ota: fleet: cannot write %s (%r); the report queue stays as it was" % (path, e))
            return False
        lines = None
        # What is on flash is the queue now (read back: this also checks the write).
        got = _scan(path, self.buf)
        if got is None:
            print("ota: fleet: %s did not read back" % path)
            return False
        self.h, self.spans = got
        self.path = path
        self.new = []
        self.dirty = False
        return True

    def body(self, sent, fn):
        # The reports `sent` (spans, in order) as the protocol's list items: fn(piece) for each
        # piece of their lines, joined by "," (the newlines between them, in the file).
        mv = memoryview(self.buf)
        with open(self.path, "rb") as f:
            f.seek(sent[0][1])
            left = sent[-1][2] - sent[0][1]
            while left:
                k = f.readinto(mv[:min(len(mv), left)])
                if not k:
                    raise OSError(5)
                i = self.buf.find(b"\n", 0, k)
                while i >= 0:
                    self.buf[i] = 0x2C  # ","
                    i = self.buf.find(b"\n", i + 1, k)
                fn(mv[:k])
                left -= k


def _slots():
    # {label: state} of the OTA slots, as ota.status() says it, in the protocol's spelling
    # ("pending-verify"); a slot without an otadata record is "empty" when it holds no image.
    from ota import slots, otadata
    parts = slots.ota_slots()
    states = otadata.slot_states(len(parts), otadata.records())
    one = bytearray(1)
    out = {}
    for i in range(len(parts)):
        s = states.get(i, "UNDEFINED")
        if s == "UNDEFINED":
            parts[i].readblocks(0, one, 0)
            if one[0] != 0xE9:
                s = "EMPTY"
        elif s == "UNKNOWN":
            s = "UNDEFINED"
        out[parts[i].info()[4]] = s.lower().replace("_", "-")
    return out


def _line(n, event, code, detail, target, digest, boots):
    # One report, as bytes without its "dropped" value and closing brace (Queue.save adds them).
    import gc
    import machine
    from ota import slots
    heap = gc.mem_free()
    s = ident.settings()
    run = slots.running()
    cause = getattr(machine, "reset_cause", None)
    fixed = (json.dumps(event), json.dumps(code), slots.read_app_desc(run)[0], run.info()[4],
             json.dumps(_slots()), s[4], s[5], json.dumps(target[:32] if target else None),
             json.dumps(digest), boots, cause() if cause else 0, heap)
    d = detail[:_DETAIL_MAX] if detail else None
    while True:
        line = ('{"n":%d,"event":%s,"code":%s,"detail":%s,"version":%s,"slot":"%s","slots":%s,'
                '"board":"%s","chip":"%s","target":%s,"digest":%s,"boots":%d,"reset":%d,"heap":%d,'
                '"dropped":' % ((n, fixed[0], fixed[1], json.dumps(d), json.dumps(fixed[2]))
                                + fixed[3:])).encode()
        over = len(line) + 12 - _LINE_MAX  # room for the dropped count and "}"
        if over <= 0 or not d:
            return line
        d = d[:len(d) - over] if len(d) > over else None


# ---- the hooks (ota._report(name, ...): ota/apply.py, ota/trial.py, ota/__init__.py) ----------


def event(ev, code=None, detail=None, target=None, digest=None):
    # digest: the release as the agent keys it (manifest body); reported by its envelope's
    q = Queue()
    q.add(ev, code, detail, target, q.env(digest))
    q.save()


def later(ev, code=None, detail=None, target=None, digest=None):
    # the report of a rollback, for the image that comes back to make (see Queue)
    q = Queue()
    q.h["later"] = [ev, code, detail[:_DETAIL_MAX] if detail else None, target, q.env(digest)]
    q.dirty = True
    q.save()


def flush():
    # ota._send(): the queue, sent if there is anything to send and the network is up (ota/fleet.py,
    # loaded only then); the boot counted either way.
    q = Queue()
    if q.spans or q.new:
        from ota.fleet import send
        send(q)
    q.save()


def result(st, o=None, buf=None):
    # The end of update(): what it recorded in the state (last_result, last_error, detail), after
    # "checked" and "downloading" if it tried to install the release it was offered (o: ota/offer.py's
    # Offer). All in one write, made once the update's own code is gone: nothing leaves before
    # the call ends anyway (ota._send), and nothing is written between its stages.
    ev = ident.event_of(st.get("last_result"), st.get("last_error"))
    if not ev:
        return
    q = Queue(buf)
    target = env = None
    if o is not None:
        env = o.env
        if o.install:
            target = o.m.version
            if ev != "checked":  # "skipped": rejected before, or backed off: nothing was tried
                q.h["rel"] = [o.digest, env]
                q.add("checked", None, None, target, env)
                q.add("downloading", None, None, target, env)
    q.add(ev, st.get("last_error"), st.get("detail"), target, env)
    q.save()
