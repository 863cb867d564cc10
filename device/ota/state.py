# What the agent remembers across resets, in ota_state.json (replaced atomically):
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
#   retried      digest of the release that already had its one extra try after a rollback
#   retry_after  seconds a server asked us to wait (Retry-After), or null
#   rejected     releases never to try again (manifest digest, version, reason), newest last
#   floor        the security counter of the newest confirmed release (anti-rollback)
from ota import jsonfile
from ota.errors import OtaError, DEVICE

PATH = "ota_state.json"
_MAX = 8192
_REJECTED_MAX = 8


def _fresh():
    return {"last_result": None, "last_error": None, "detail": "", "pending": None,
            "rejected": [], "floor": 0}


def load():
    for path in (PATH, PATH + ".tmp"):
        try:
            st = jsonfile.read(path, _MAX)
        except (ValueError, OSError):
            st = None  # corrupt: fall back; losing it costs at most one more rollback
        if isinstance(st, dict):
            return _sane(st)
    return _fresh()


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
    for k, t in (("last_result", str), ("last_error", str), ("retried", str), ("detail", str), ("rollback", str),
                 ("retry_after", int), ("floor", int)):
        v = st.get(k)
        if isinstance(v, t) and (t is str or v >= 0):
            base[k] = v
    for k, text in (("pending", ("digest", "version", "slot", "?", "from")), ("progress", ("digest", "slot"))):
        if _rec(st.get(k), text):
            base[k] = st[k]
    rej = st.get("rejected")
    if isinstance(rej, list):
        base["rejected"] = [r for r in rej if isinstance(r, dict) and isinstance(r.get("digest"), str)][-_REJECTED_MAX:]
    return base


def save(st):
    # A filesystem that is full (or broken) must not crash the application: the caller gets
    # an OtaError, and the updater installs nothing it could not record.
    try:
        jsonfile.write(PATH, st)
    except OSError as e:
        raise OtaError("state-unwritable", "cannot write %s (%r): is the filesystem full?" % (PATH, e), DEVICE)


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


def reject(st, digest, version, reason):
    rej = [r for r in st["rejected"] if r.get("digest") != digest]
    rej.append({"digest": digest, "version": version, "reason": reason})
    st["rejected"] = rej[-_REJECTED_MAX:]
