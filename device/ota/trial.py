# ota.confirm(health, timeout_ms): run on every boot, early in main.py. Small on purpose.
#
# On the first boot of a new image the bootloader has put its otadata record in
# PENDING_VERIFY. We run the health check; if it passes, the image is marked VALID
# (mark_app_valid_cancel_rollback) and kept. If it fails, raises or runs out of time, we
# record why, reject the release for good, and reset: at that reset the bootloader turns
# PENDING_VERIFY into ABORTED and boots the previous image. If the new image resets before
# it gets here (a crash, a watchdog, or power lost), the same happens without us; the old
# image then finds the install still pending in its state, records the rollback, and gives
# the release one more try (the old image cannot tell a power cut from a crash) before
# rejecting it. If set_boot itself was cut short, nothing was tried: it is simply redone.
# A state file that cannot be written stops none of this (state.save_or_log): the next boot
# sees the same and tries to record it again.
import time
from ota import state, otadata, slots

_POLL_MS = 100


def _log(msg):
    print("ota: " + msg)


def _health(health, timeout_ms):
    # -> (ok, code, detail). health() returns True (pass), False (fail) or None (not decided
    # yet: asked again every 100 ms until the time is up).
    if health is None:
        return True, None, ""
    t0 = time.ticks_ms()
    while True:
        try:
            r = health()
        except Exception as e:  # the check itself is broken: that is a failed check
            return False, "health-exception", repr(e)
        if time.ticks_diff(time.ticks_ms(), t0) > timeout_ms:
            return False, "health-timeout", "health check took more than %d ms" % timeout_ms
        if r is True or (r is not None and r):
            return True, None, ""
        if r is not None:
            return False, "health-failed", "health check returned %r" % (r,)
        time.sleep_ms(_POLL_MS)


def confirm(health=None, timeout_ms=30000):
    # Arguments are checked on every boot, not only on the first boot of a new image, so a
    # mistake shows at the desk instead of rolling back the first update in the field.
    if health is not None and not callable(health):
        raise TypeError("ota.confirm(health): health must be a function or None")
    if not isinstance(timeout_ms, int) or timeout_ms <= 0:
        raise ValueError("ota.confirm(timeout_ms): a number of milliseconds > 0")
    all_slots = slots.ota_slots()
    run = slots.running()
    label = run.info()[4]
    recs = otadata.records()
    act = otadata.active(len(all_slots), recs)
    pending_verify = act is not None and act[1] == "PENDING_VERIFY" and \
        all_slots[act[0]].info()[2] == run.info()[2]
    st = state.load()
    pend = st.get("pending")
    if not pending_verify:
        if pend and pend.get("slot") != label and not _was_booted(pend, recs, all_slots):
            # set_boot() never reached the flash (power failed while otadata was written):
            # nothing was tried, nothing to reject. The next update() finds the image
            # complete in its slot, checks it again and sets it to boot.
            st["pending"] = None
            state.record(st, "interrupted", "interrupted",
                         "setting %s to boot did not complete; the next update retries" % pend.get("version"))
            state.save_or_log(st)
            _log("setting %s to boot was interrupted; will retry" % pend.get("version"))
            return {"result": "interrupted", "error": "interrupted"}
        if pend and pend.get("slot") != label:
            # We set another slot to boot, yet we run here: it never confirmed itself (a
            # crash, a watchdog reset, or power lost before the health check passed) and the
            # bootloader rolled back. A power cut is no fault of the release, so it gets one
            # more try (its image is still complete in the slot); failing twice rejects it.
            st["pending"] = None
            if st.get("retried") == pend.get("digest"):
                st["progress"] = None
                state.reject(st, pend.get("digest"), pend.get("version"), "rolled-back")
                detail = "%s did not confirm itself, twice; rejected" % pend.get("version")
            else:
                st["retried"] = pend.get("digest")
                detail = "%s did not confirm itself before a reset; it gets one more try" % pend.get("version")
            state.record(st, "rolled-back", "rolled-back", detail)
            state.save_or_log(st)
            _log("rolled back: " + detail)
            return {"result": "rolled-back", "error": "rolled-back"}
        if pend and act is not None and act[1] == "VALID":
            # Marked valid, then power failed before the state was saved: finish the job.
            _confirmed(st, pend)
            return {"result": "confirmed", "error": None}
        return {"result": "nothing-to-confirm", "error": None}
    ok, code, detail = _health(health, timeout_ms)
    if ok:
        from esp32 import Partition
        Partition.mark_app_valid_cancel_rollback()
        _confirmed(st, pend or {"version": None, "counter": 0})
        _log("new firmware confirmed")
        return {"result": "confirmed", "error": None}
    version = pend.get("version") if pend else None
    if pend:
        state.reject(st, pend.get("digest"), version, code)
    st["pending"] = None
    st["progress"] = None
    state.record(st, "rolled-back", code, "%s failed its health check (%s); rolling back" % (version, detail))
    state.save_or_log(st)
    _log("health check failed (%s: %s); resetting to roll back" % (code, detail))
    import machine
    machine.reset()


def _was_booted(pend, recs, all_slots):
    # Did set_boot() write its record? The agent erased that otadata sector just before
    # set_boot (pending["sector"]), so any intact record there naming the pending slot is the
    # one set_boot wrote (and the bootloader may since have marked ABORTED).
    n = len(all_slots)
    for seq, _state, sector in recs:
        if sector == pend.get("sector") and all_slots[(seq - 1) % n].info()[4] == pend.get("slot"):
            return True
    return False


def _confirmed(st, pend):
    st["pending"] = None
    st["progress"] = None
    c = pend.get("counter") or 0
    if c > st["floor"]:
        st["floor"] = c
    state.record(st, "confirmed", None, "running %s" % pend.get("version"))
    state.save_or_log(st)
