# What the agent remembers across resets, in ota_state.json (replaced atomically):
#   last_result  what the last update/confirm did: installed, confirmed, up-to-date, refused,
#                failed, rolled-back, interrupted, skipped
#   last_error   null or a stable error code; detail: the human-readable reason
#   progress     the download under way: {"digest", "slot", "done" (bytes) or "chunk"}
#   pending      the release written and set to boot but not yet confirmed:
#                {"digest", "version", "slot", "counter", "sector" (otadata sector erased
#                for set_boot)}
#   retried      digest of the release that already had its one extra try after a rollback
#   retry_after  seconds a server asked us to wait (Retry-After), or null
#   rejected     releases never to try again (manifest digest, version, reason), newest last
#   floor        the security counter of the newest confirmed release (anti-rollback)
from ota import jsonfile

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
            base = _fresh()
            base.update(st)
            return base
    return _fresh()


def save(st):
    jsonfile.write(PATH, st)


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
