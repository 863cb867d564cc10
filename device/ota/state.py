# What the agent remembers across resets. Two copies, ota_state.0.json and ota_state.1.json,
# each with a CRC and a generation number: a save writes the older copy, so a power cut while
# writing (torn on FAT; LittleFS keeps the old content of a file not closed) leaves the newer
# one intact. No rename: on FAT (MicroPython's VfsFat.rename removes an existing target first) a
# power cut between that remove and the rename, then one during the next save, lost everything.
# An ota_state.json of an earlier agent is read when neither copy is there.
#   last_result  what the last update/confirm did: installed, confirmed, up-to-date, refused,
#                failed, rolled-back, interrupted, skipped
#   last_error   null or a stable error code; detail: the human-readable reason
#   progress     the download under way: {"digest", "slot", "done" (bytes) or "chunk"}
#   pending      the release written and set to boot but not yet confirmed:
#                {"digest", "version", "slot", "counter", "sector" (otadata sector erased
#                for set_boot), "from" (the slot it was installed from), "boots" (starts of
#                the new image on a board that does not roll back by itself), "marking" (1:
#                mark_app_valid_cancel_rollback() is under way)}
#   rollback     what this board does with an unconfirmed image, learnt at the first update:
#                "bootloader" (ESP-IDF rolls it back), "no-rollback" or "board-confirms"
#                (the agent does; see ota/trial.py)
#   backoff      the release whose attempts keep failing: {"digest", "version", "code",
#                "fails", "skip" (checks still to skip)} (see backoff_fail)
#   trials       failures of a release's trial blamed on the environment: {"digest", "env"}
#   retry_after  seconds a server asked us to wait (Retry-After), or null
#   gen          generation of this copy of the state (the newer copy wins)
#   rejected     releases never to try again (manifest digest, version, reason), newest last
#   floor        the security counter of the newest confirmed release (anti-rollback)
#   rollout_seen the newest `issued` of a rollout document accepted (docs/rollout.md): older
#                ones are replays; the device's time is never earlier
from ota import jsonfile
from ota.errors import OtaError, DEVICE

PATHS = ("ota_state.0.json", "ota_state.1.json")
LEGACY = "ota_state.json"
_MAX = 8192
_REJECTED_MAX = 8


def _fresh():
    # every field, always: a state loaded, changed and compared (save) keeps its key order
    return {"last_result": None, "last_error": None, "detail": "", "pending": None, "progress": None,
            "rejected": [], "floor": 0, "retry_after": None, "rollback": None, "backoff": None,
            "trials": None, "rollout_seen": 0, "gen": 0}


def load():
    best = None
    for path in PATHS:
        st = jsonfile.read_sealed(path, _MAX)
        if isinstance(st, dict) and isinstance(st.get("gen"), int) and (best is None or st["gen"] > best["gen"]):
            best = st
    if best is None:
        for path in (LEGACY, LEGACY + ".tmp"):
            try:
                best = jsonfile.read(path, _MAX)
            except (ValueError, OSError):
                best = None  # corrupt: fall back; losing it costs at most one more rollback
            if isinstance(best, dict):
                break
    st = _sane(best) if isinstance(best, dict) else _fresh()
    _remember(_canon(st))
    return st


# The SHA-256 of the state as last read or written, without its generation (ota._seen, on the
# package: this module is dropped and loaded again during an update; a digest, not a copy of the
# state, which would take a KiB of heap for good): a save that would write the same again
# writes nothing. A device that checks every minute and is up to date then writes its
# filesystem never, not 1,440 times a day (FAT has no wear levelling).


def _remember(c):
    # ota._seen updated in place: a save in the middle of a download leaves no new object
    # between the download's buffers (a chunk's decompressor needs 1.3 KiB in one piece).
    import ota
    s = getattr(ota, "_seen", None)
    if s is None:
        ota._seen = bytearray(c)
    else:
        s[:] = c


def _canon(st):
    import json
    from hashlib import sha256
    g = st.pop("gen", None)
    try:
        return sha256(json.dumps(st)).digest()
    finally:
        if g is not None:
            st["gen"] = g


def _rec(d, text):
    # a dict with the string fields `text` (those after a "?" may be missing), every other
    # field a whole number >= 0
    if not isinstance(d, dict):
        return False
    opt = False
    for k in text:
        if k == "?":
            opt = True
        elif not isinstance(d.get(k), str) and not (opt and k not in d):
            return False
    for k, v in d.items():
        if k not in text and not (isinstance(v, int) and v >= 0):
            return False
    return True


def _sane(st):
    # The file is the agent's own, but it may come from another agent version or a hand edit:
    # a field of the wrong type goes back to its fresh value, so that it cannot make every
    # later update() fail the same way.
    base = _fresh()
    for k, t in (("last_result", str), ("last_error", str), ("detail", str), ("rollback", str),
                 ("retry_after", int), ("floor", int), ("rollout_seen", int), ("gen", int)):
        v = st.get(k)
        if isinstance(v, t) and (t is str or v >= 0):
            base[k] = v
    for k, text in (("pending", ("digest", "version", "slot", "?", "from")), ("progress", ("digest", "slot")),
                    ("backoff", ("digest", "?", "version", "code")), ("trials", ("digest",))):
        if _rec(st.get(k), text):
            base[k] = st[k]
    rej = st.get("rejected")
    if isinstance(rej, list):
        base["rejected"] = [r for r in rej if isinstance(r, dict) and isinstance(r.get("digest"), str)][-_REJECTED_MAX:]
    return base


def save(st):
    # A filesystem that is full (or broken) must not crash the application: the caller gets
    # an OtaError, and the updater installs nothing it could not record.
    import ota
    c = _canon(st)
    if c == getattr(ota, "_seen", None):
        return
    st["gen"] = st.get("gen", 0) + 1
    path = PATHS[st["gen"] % 2]
    try:
        jsonfile.write_sealed(path, st)
    except OSError as e:
        raise OtaError("state-unwritable", "cannot write %s (%r): is the filesystem full?" % (path, e), DEVICE)
    _remember(c)


def save_or_log(st):
    # save() where going ahead matters more than the record (a confirmation, a rollback, the
    # result of an update): the failure is printed and returned, not raised.
    try:
        save(st)
    except OtaError as e:
        print("ota: %s: %s" % (e.code, e.detail))
        return e


def record(st, result, error=None, detail=""):
    st["last_result"] = result
    st["last_error"] = error
    st["detail"] = detail


def rejected_reason(st, digest):
    for r in st["rejected"]:
        if r.get("digest") == digest:
            return r.get("reason")
    return None


# ---- repeated failures -----------------------------------------------------------------------
# Back-off: after the n-th failed attempt in a row at the same release (a payload that does not
# verify, a download that makes no progress, a rollback blamed on the environment) the next
# 2^n - 1 checks skip it, at most 255: with a check a minute, 1, 3, 7, 15, ... minutes, then
# every 4.3 hours. Counted in checks, not seconds: a device without a clock cannot tell time
# across a power cut. A slot rewritten at that rate wears out no NOR flash.
_SKIP_MAX = 255


def backoff_skip(st, digest):
    # True if this check skips the release (and counts the skip).
    b = st.get("backoff")
    if b and b.get("digest") == digest and b.get("skip", 0) > 0:
        b["skip"] -= 1
        return True
    return False


def backoff_fail(st, digest, version, code):
    b = st.get("backoff")
    fails = b.get("fails", 0) + 1 if b and b.get("digest") == digest else 1
    st["backoff"] = {"digest": digest, "version": version, "code": code, "fails": fails,
                     "skip": min((1 << min(fails, 8)) - 1, _SKIP_MAX)}


def backoff_clear(st, digest=None):
    b = st.get("backoff")
    if b and (digest is None or b.get("digest") == digest):
        st["backoff"] = None


def reject(st, digest, version, reason):
    rej = [r for r in st["rejected"] if r.get("digest") != digest]
    rej.append({"digest": digest, "version": version, "reason": reason})
    st["rejected"] = rej[-_REJECTED_MAX:]
