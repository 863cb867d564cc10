# ota.confirm(health, timeout_ms): run on every boot, early in main.py. Small on purpose.
#
# On the first boot of a new image the bootloader has put its otadata record in
# PENDING_VERIFY. We run the health check; if it passes, the image is marked VALID
# (mark_app_valid_cancel_rollback) and kept. If it fails, raises or runs out of time, we
# record why, reject the release for good, and reset: at that reset the bootloader turns
# PENDING_VERIFY into ABORTED and boots the previous image. If the new image crashes before
# it gets here, the same happens without us; the old image then finds the install still
# pending in its state and records the rollback.
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
    all_slots = slots.ota_slots()
    run = slots.running()
    label = run.info()[4]
    act = otadata.active(len(all_slots), otadata.records())
    pending_verify = act is not None and act[1] == "PENDING_VERIFY" and \
        all_slots[act[0]].info()[2] == run.info()[2]
    st = state.load()
    pend = st.get("pending")
    if not pending_verify:
        if pend and pend.get("slot") != label:
            # We set another slot to boot, yet we run here: it never confirmed (crash, reset,
            # or the bootloader found it unbootable) and the bootloader rolled back.
            state.reject(st, pend.get("digest"), pend.get("version"), "rolled-back")
            st["pending"] = None
            state.record(st, "rolled-back", "rolled-back",
                         "%s did not confirm itself before a reset; running %s again"
                         % (pend.get("version"), label))
            state.save(st)
            _log("rolled back from %s: it did not confirm itself" % pend.get("version"))
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
    state.record(st, "rolled-back", code, "%s failed its health check (%s); rolling back" % (version, detail))
    state.save(st)
    _log("health check failed (%s: %s); resetting to roll back" % (code, detail))
    import machine
    machine.reset()


def _confirmed(st, pend):
    st["pending"] = None
    c = pend.get("counter") or 0
    if c > st["floor"]:
        st["floor"] = c
    state.record(st, "confirmed", None, "running %s" % pend.get("version"))
    state.save(st)
