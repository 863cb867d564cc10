# Rollout documents (docs/rollout.md): who may install a release now. The manifest stage
# (ota/updater.py, ota/verify.py) fetches rollout.json beside a manifest it would install and checks its
# signature (ota/envelope.py and ota/signature.py, against the rollout role's keys only); this
# module then parses the signed body and decides, in the spec's order and with its codes, the
# same rules as host_tools/rolloutdoc.py (tests/test_rollout_device.py runs both on the same
# cases). Bytes in, a code out, no I/O but the clock (ota/clock.py, once per stage).
#
# Small ints on an ESP32 are 31 bits: Unix times (issued, expires, now) and the 32-bit bucket are
# big ints there, which MicroPython's arithmetic and comparisons take as they are.
from micropython import const
from ota.errors import OtaError

PAYLOAD_TYPE = "application/vnd.mpota.rollout+json"  # checked by ota/offer.py (_ROLLOUT_TYPE)
_FULL_BP = const(10000)   # share_bp of the whole fleet
_PRIME = const(1000003)   # jitter = (bucket mod _PRIME) mod (jitter_s + 1)
_STAGES_MAX = const(16)
_NAMES_MAX = const(64)


def _bad(field):
    # Short on purpose: every string constant of a loaded .mpy is interned for good (the qstr
    # pool is never freed), and this module is loaded on every install with a rollout role.
    return OtaError("rollout-bad", "rollout.json: bad " + field + " (docs/rollout.md)")


def _int(v):
    return type(v) is int  # not JSON's true and false


def _names(v, what):
    if not isinstance(v, list) or not all(isinstance(n, str) and 0 < len(n) <= 64 for n in v):
        raise _bad(what)
    return len(v)


def check(doc, window=True):
    # The body of schema 1 (docs/rollout.md, "The document"), else OtaError rollout-bad.
    # window=False: all but the window (judge() checks it once the names are let go).
    if not isinstance(doc, dict) or doc.get("schema") != 1:
        raise _bad("schema")
    rel = doc.get("release")
    if not isinstance(rel, str) or len(rel) != 64 or not all(c in "0123456789abcdef" for c in rel):
        raise _bad("release")
    for k in ("version", "rollout"):
        if not isinstance(doc.get(k), str) or not 0 < len(doc[k]) <= 64:
            raise _bad(k)
    i, e = doc.get("issued"), doc.get("expires")
    if not (_int(i) and _int(e) and 0 < i < e < 1 << 40):
        raise _bad("issued/expires")
    st = doc.get("stages")
    if not isinstance(st, list) or not 0 < len(st) <= _STAGES_MAX:
        raise _bad("stages")
    last = 0
    for s in st:
        if not (isinstance(s, dict) and _int(s.get("at")) and _int(s.get("share_bp"))
                and 0 <= s["share_bp"] <= _FULL_BP and s["at"] >= last):
            raise _bad("stages")
        last = s["at"]
    h = doc.get("halted")
    if h is not None and not (isinstance(h, str) and len(h) <= 160):
        raise _bad("halted")
    t = doc.get("targets")
    if t is not None:
        if not isinstance(t, dict):
            raise _bad("targets")
        if sum(_names(t[k], "targets") for k in ("boards", "groups", "devices") if k in t) > _NAMES_MAX:
            raise _bad("targets")
    if _names(doc.get("exclude") or [], "exclude") > _NAMES_MAX:
        raise _bad("exclude")
    if window and doc.get("window") is not None:
        _window_check(doc)
    return doc


def _window_check(doc):
    if doc.get("window") is not None:
        from ota.window import check as window_check
        try:
            window_check(doc["window"])
        except ValueError as e:
            raise _bad("window: %s" % e)


def bucket(device_id, release):
    # the first 4 bytes, big-endian, of SHA-256(device id as UTF-8 || the release digest's 32 bytes)
    import hashlib
    from binascii import unhexlify
    return int.from_bytes(hashlib.sha256(device_id.encode() + unhexlify(release)).digest()[:4], "big")


def share_at(stages, now):
    share = 0
    for s in stages:
        if s["at"] <= now:
            share = s["share_bp"]
    return share


def targeted(doc, device_id, board, groups):
    t = doc.get("targets") or {}
    if t.get("boards") and board not in t["boards"]:
        return False
    if t.get("groups") or t.get("devices"):
        g = t.get("groups") or []
        return device_id in (t.get("devices") or []) or any(x in g for x in groups)
    return True


def decide(doc, device_id, board, groups, release, now, clock_known, seen=0, device_window=None, member=None):
    # None if the device installs `release` now under `doc` (its signature checked), else the
    # held code, in docs/rollout.md's order. `now`: the clock's Unix time (0 if unknown).
    # member: targeted and not excluded, if judged already (judge() lets the names go first).
    if doc["release"] != release:
        return "rollout-other-release"
    if doc["issued"] < seen:
        return "rollout-replayed"
    # never earlier than the newest document seen; without a clock, at least this one's issue
    now = max(now, seen) if clock_known else max(now, seen, doc["issued"])
    if doc["expires"] <= now:
        return "rollout-expired"
    if doc.get("halted") is not None:
        return "rollout-halted"
    b = bucket(device_id, release)
    if member is None:
        member = targeted(doc, device_id, board, groups) and device_id not in (doc.get("exclude") or [])
    if not member or not b * _FULL_BP < share_at(doc["stages"], now) << 32:
        return "not-in-rollout"
    windows = [w for w in (doc.get("window"), device_window) if w]
    if windows and not clock_known:
        return "no-clock"
    if windows:
        from ota.window import is_open
        for w in windows:
            if not is_open(w, now, (b % _PRIME) % (w.get("jitter_s", 0) + 1)):
                return "outside-window"
    return None


def judge(cfg, st, o, box):
    # The signed body of o's rollout document (box: [body], emptied here so that no caller's
    # frame keeps the bytes): None (install), or (held code, detail). Raises OtaError
    # rollout-bad. An accepted document (not another release's, not a replay) raises
    # st["rollout_seen"], which the payload stage saves with the update's result.
    # Memory: the parsed document is this stage's largest data (up to 128 names), so the clock
    # comes first (its module dropped after it); the names are judged and let go before the
    # window's code loads.
    import ota
    t = getattr(cfg, "now", False)
    if t is False:  # once per stage: the NTP request is made for the first document only
        from ota import clock
        t = cfg.now = clock.now(cfg.ntp, min(cfg.timeout_s, 3))
        clock = None
        ota._drop(("ota.clock",))
    did = cfg.device_id  # ota/ident.py's rule: the configured id, else machine.unique_id() in hex
    if not did:
        import machine
        from binascii import hexlify
        did = hexlify(machine.unique_id()).decode()
    from ota.jsonfile import loads
    try:
        doc = loads(box.pop())
    except ValueError:
        raise _bad("JSON")
    finally:
        loads = None
        ota._drop(("ota.jsonfile",))
    check(doc, False)
    member = targeted(doc, did, cfg.board, cfg.groups) and did not in (doc.get("exclude") or [])
    doc["targets"] = doc["exclude"] = None
    import gc
    gc.collect()
    _window_check(doc)
    seen = st.get("rollout_seen") or 0
    code = decide(doc, did, cfg.board, cfg.groups, o.env, t or 0, t is not None, seen, cfg.window, member)
    if code not in ("rollout-other-release", "rollout-replayed"):
        o.issued = doc["issued"]  # offer.py: a newer document seen later in this check supersedes it
        if doc["issued"] > seen:
            st["rollout_seen"] = doc["issued"]
    if code is None or code == "outside-window":
        ws = [w for w in (doc.get("window"), cfg.window) if w]
        if ws:  # judged again before set_boot() (ota/install.py): a download can outlast a window
            b = bucket(did, o.env)
            o.windows = [(w, (b % _PRIME) % (w.get("jitter_s", 0) + 1)) for w in ws]
    if code is None:
        return None
    return code, "rollout %s, release %s" % (doc["rollout"], doc["release"][:16])
