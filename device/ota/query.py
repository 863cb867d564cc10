# ota.check(): what ota.update() would do, without downloading the payload or changing any
# state: the manifest stage of ota/updater.py, answered as a dict. A module of its own so that
# update()'s manifest stage does not carry this code.
from ota.errors import OtaError


def check(buf):
    # What update() would do, without downloading the payload or changing any state.
    from ota import state
    st = state.load()
    state = None
    from ota.updater import _offer, _no_limit
    try:
        cfg, o = _offer(st, memoryview(buf))
    except OtaError as e:
        return {"update": False, "error": e.code, "detail": e.detail}
    except MemoryError:  # as in update(): a query must not take the application down
        return {"update": False, "error": "no-memory", "detail": "out of heap during the check"}
    except Exception as e:
        import sys
        sys.print_exception(e)
        return {"update": False, "error": "internal-error", "detail": repr(e)[:120]}
    finally:
        _no_limit()
    if o.install and o.rejected:
        return {"update": False, "version": o.m.version, "running": o.running, "error": "rejected",
                "detail": "release %s was rejected before: %s" % (o.m.version, o.rejected)}
    if o.install and o.hold:  # held back by its rollout document (docs/rollout.md)
        return {"update": False, "version": o.m.version, "running": o.running, "error": o.hold[0],
                "detail": o.hold[1]}
    return {"update": o.install, "version": o.m.version, "running": o.running, "error": None,
            "detail": "" if o.install else "up to date"}
