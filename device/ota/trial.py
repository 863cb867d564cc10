# ota.guard() and ota.confirm(): run on every boot, early. Small on purpose.
#
# A trial boot is the first start of an image this agent installed, before it is confirmed.
# On a stock ESP32 build the bootloader puts it in PENDING_VERIFY and, at the next reset, turns
# that into ABORTED and boots the previous image (CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE). But a
# reset must come: an uncaught exception in main.py leaves the board at the REPL and a hang stays
# a hang (nothing in MicroPython's ESP32 port resets it). So on a trial boot the agent arms the
# watchdog (machine.WDT): an exception, a hang, or a health check that never returns ends in a
# watchdog reset, and the bootloader rolls back. confirm() feeds it while it polls the health
# check; once the image is confirmed it resets the board, since an ESP32 watchdog cannot be
# stopped: the application then starts on a normal boot, with nothing armed.
#
# Boards where the bootloader cannot do it: a build without CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE
# (the record stays UNDEFINED, or NEW under an older bootloader), or a board that marks every
# image valid at start-up (ARDUINO_NANO_ESP32's board_init.c). The agent notices (the image it
# installed runs, and its record is not PENDING_VERIFY), says so in ota.status()["rollback"]
# ("no-rollback", "board-confirms"), and rolls back itself: it sets the previous slot to boot
# after a failed health check, or when the image starts a second time without being confirmed.
#
# The old image, after a reset, finds the install still pending in its state: it records the
# rollback and gives the release one more try (it cannot tell a power cut from a crash) before
# rejecting it. If set_boot itself was cut short, nothing was tried: it is redone. If the new
# image has not booted yet (a soft reset or a wake from deep sleep skips the bootloader's
# otadata step), the install is left as it is: it boots at the next reset.
import time
import ota
from ota import state, otadata, slots

_POLL_MS = 100
WATCHDOG_MS = 60000


def _log(msg):
    print("ota: " + msg)


class _Boot:
    # What this boot is, from otadata and the state file.
    def __init__(self):
        self.slots = slots.ota_slots()
        run = slots.running()
        self.label = run.info()[4]
        self.recs = otadata.records()
        n = len(self.slots)
        self.act = otadata.active(n, self.recs)
        self.run_state = otadata.slot_states(n, self.recs).get(slots.index_of(run, self.slots))
        self.st = state.load()
        self.pend = self.st.get("pending")
        self.kind = self._trial()

    def active_label(self):
        return self.slots[self.act[0]].info()[4] if self.act is not None else None

    def _trial(self):
        # None, or who keeps this trial: "bootloader" (PENDING_VERIFY: it rolls back at the next
        # reset), "no-rollback" or "board-confirms" (nobody but us).
        if self.run_state == "PENDING_VERIFY" and self.active_label() == self.label:
            return "bootloader"
        p = self.pend
        if not p or p.get("slot") != self.label:
            return None
        if self.run_state == "VALID":
            # VALID and we began marking it: power failed after the mark; else the board did it
            return None if p.get("marking") else "board-confirms"
        return "no-rollback"  # NEW or UNDEFINED after a boot: the bootloader did not look


def _wdt(ms):
    # The trial's watchdog: armed once per start (a second WDT() only changes the timeout).
    # Its timeout: the argument, else "watchdog_ms" in ota_config.json, else 60 s.
    import ota
    w = getattr(ota, "_wdt", None)
    if w is None:
        if ms is None:
            from ota import jsonfile
            try:
                ms = jsonfile.read("ota_config.json", 4096).get("watchdog_ms")
            except (ValueError, OSError, AttributeError):
                ms = None
            if not isinstance(ms, int) or not 1000 <= ms <= 3600000:
                ms = WATCHDOG_MS
        import machine
        w = ota._wdt = machine.WDT(timeout=ms)
    return w


def _start(b, watchdog_ms):
    # Once per start of a trial image: arm the watchdog, count the start, and roll back by
    # ourselves if the bootloader will not and this image already started once unconfirmed.
    import ota
    if getattr(ota, "_wdt", None) is not None:
        return
    _wdt(watchdog_ms)
    st, p = b.st, b.pend
    if b.kind != "bootloader" and p is not None:
        p["boots"] = p.get("boots", 0) + 1
        if st.get("rollback") != b.kind:
            st["rollback"] = b.kind
            _log("warning: %s: this board does not roll back by itself; the agent does" % b.kind)
        state.save_or_log(st)
        if p["boots"] > 1:
            # It started again without being confirmed. A power cut is no fault of the release:
            # its trial goes on (a few times at most); a watchdog reset, a panic or a reset of
            # its own are evidence against it: we roll back, as a bootloader would have.
            import machine
            cause = machine.reset_cause()
            if cause != machine.PWRON_RESET or p["boots"] > 1 + ENV_TRIES:
                _log("%s started again without being confirmed; rolling back" % p.get("version"))
                p["cause"] = cause
                state.save_or_log(st)
                _set_back(b)


def _set_back(b):
    # Roll back in software: set the slot we updated from to boot, and reset. The old image then
    # finds the install pending and records the rollback (as after a bootloader rollback).
    src = b.pend.get("from")
    for p in b.slots:
        label = p.info()[4]
        if label == src or (src is None and label != b.label):
            try:
                p.set_boot()
                break
            except OSError as e:
                _log("cannot set %s to boot (%r)" % (label, e))
    import machine
    machine.reset()


def _check_ms(name, v):
    if v is not None and (not isinstance(v, int) or v <= 0):
        raise ValueError("ota.%s: a number of milliseconds > 0" % name)


def guard(watchdog_ms=None):
    _check_ms("guard(watchdog_ms)", watchdog_ms)
    b = _Boot()
    if b.kind is not None:
        _start(b, watchdog_ms)
    return b.kind


def _health(health, timeout_ms, wdt):
    # -> (ok, code, detail). health() returns True (pass), False (fail) or None (not decided
    # yet: asked again every 100 ms until the time is up). The watchdog is fed between calls:
    # a single call that blocks longer than its timeout resets the board.
    if health is None:
        return True, None, ""
    t0 = time.ticks_ms()
    while True:
        wdt.feed()
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


def confirm(health=None, timeout_ms=30000, watchdog_ms=None):
    # Arguments are checked on every boot, not only on the first boot of a new image, so a
    # mistake shows at the desk instead of rolling back the first update in the field.
    if health is not None and not callable(health):
        raise TypeError("ota.confirm(health): health must be a function or None")
    _check_ms("confirm(timeout_ms)", timeout_ms if timeout_ms is not None else 0)
    _check_ms("confirm(watchdog_ms)", watchdog_ms)
    b = _Boot()
    st, pend = b.st, b.pend
    if b.kind is None:
        return _not_a_trial(b)
    _start(b, watchdog_ms)
    ok, code, detail = _health(health, timeout_ms, _wdt(watchdog_ms))
    import machine
    if ok:
        if b.kind != "board-confirms":
            if pend:
                pend["marking"] = 1  # so that a VALID record after a power cut reads as ours
                state.save_or_log(st)
            from esp32 import Partition
            Partition.mark_app_valid_cancel_rollback()
        st["rollback"] = b.kind if b.kind != "bootloader" else "bootloader"
        _confirmed(st, pend or {"version": None, "counter": 0})
        _log("new firmware confirmed; restarting so that the trial's watchdog is disarmed")
        machine.reset()
    version = pend.get("version") if pend else None
    digest = pend.get("digest") if pend else None
    if code == "health-timeout" and digest and _env_failure(st, digest):
        # The check never decided (the network may be down): not held against the release.
        # It is installed again later, with back-off; its image stays in the slot.
        state.backoff_fail(st, digest, version or "", code)
        detail = "%s: its health check never decided (%s); tried again later" % (version, detail)
    else:
        if digest:
            state.reject(st, digest, version, code)
        st["progress"] = None
        detail = "%s failed its health check (%s); rolling back" % (version, detail)
    st["pending"] = None
    state.record(st, "rolled-back", code, detail)
    state.save_or_log(st)
    ota._report("later", "rolled-back", code, detail, version, digest)  # for the image that comes back
    _log("health check failed (%s); resetting to roll back" % detail)
    if b.kind != "bootloader":
        _set_back(b)
    machine.reset()


def _not_a_trial(b):
    st, pend, label = b.st, b.pend, b.label
    if pend and pend.get("slot") != label:
        if b.active_label() == pend.get("slot"):
            # set_boot() wrote its record, but this start did not go through the bootloader's
            # otadata step (a soft reset, a wake from deep sleep): the image boots at the next reset.
            return {"result": "reboot-pending", "error": None}
        if not _was_booted(pend, b.recs, b.slots):
            # set_boot() never reached the flash (power failed while otadata was written):
            # nothing was tried, nothing to reject. The next update() finds the image
            # complete in its slot, checks it again and sets it to boot.
            st["pending"] = None
            state.record(st, "interrupted", "interrupted",
                         "setting %s to boot did not complete; the next update retries" % pend.get("version"))
            state.save_or_log(st)
            ota._report("event", "failed", "interrupted", st["detail"], pend.get("version"), pend.get("digest"))
            _log("setting %s to boot was interrupted; will retry" % pend.get("version"))
            return {"result": "interrupted", "error": "interrupted"}
        # We set another slot to boot, yet we run here: it never confirmed itself and it was
        # rolled back. How its trial ended is how this boot began (machine.reset_cause(), or
        # what the agent noted before rolling back itself): power lost (PWRON_RESET) is no fault
        # of the release: it is tried again (its image is still in the slot), with back-off, a
        # few times at most. A watchdog reset (an exception or a hang before confirm()), a panic
        # or a reset of its own are evidence against it: rejected.
        import machine
        st["pending"] = None
        cause = pend.get("cause") or machine.reset_cause()
        digest, version = pend.get("digest"), pend.get("version")
        if cause == machine.PWRON_RESET and _env_failure(st, digest):
            state.backoff_fail(st, digest, version, "trial-interrupted")
            code = "trial-interrupted"
            detail = "%s lost power before it confirmed itself; tried again later" % version
        else:
            st["progress"] = None
            code = "rolled-back"
            state.reject(st, digest, version, code)
            detail = "%s did not confirm itself (%s); rejected" % (version, _CAUSES.get(cause, "reset %d" % cause))
        state.record(st, "rolled-back", code, detail)
        state.save_or_log(st)
        ota._report("event", "rolled-back", code, detail, version, digest)
        _log("rolled back: " + detail)
        return {"result": "rolled-back", "error": code}
    if pend and b.run_state == "VALID":
        # Marked valid, then power failed before the state was saved: finish the job.
        _confirmed(st, pend)
        return {"result": "confirmed", "error": None}
    return {"result": "nothing-to-confirm", "error": None}


_CAUSES = {1: "power lost too often", 2: "a panic or a reset", 3: "a watchdog reset", 4: "deep sleep",
           5: "a soft reset"}


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
    st["trials"] = None
    state.backoff_clear(st)
    c = pend.get("counter") or 0
    if c > st["floor"]:
        st["floor"] = c
    state.record(st, "confirmed", None, "running %s" % pend.get("version"))
    state.save_or_log(st)
    ota._report("event", "confirmed", None, st["detail"], pend.get("version"), pend.get("digest"))


# Evidence against the environment (power lost during a new image's trial, a health check that
# never decided: the Wi-Fi was down) is not held against the release: it is tried again, with
# back-off, ENV_TRIES times more (5 trials in all: with a check a minute, over about half an
# hour); evidence against the release (a crash, a watchdog reset, a health check that said no)
# rejects it at once. So no image, however broken, keeps a board resetting.
ENV_TRIES = 4


def _env_failure(st, digest):
    # Count one; True while the release may still be tried again.
    t = st.get("trials")
    n = t.get("env", 0) + 1 if t and t.get("digest") == digest else 1
    st["trials"] = {"digest": digest, "env": n}
    return n <= ENV_TRIES


def forget(st, what=None):
    # The owner's way out: forget rejections (all, or of a version or digest) and back-offs.
    # Returns the versions forgotten.
    keep, gone = [], []
    for r in st["rejected"]:
        if what is None or what in (r.get("version"), r.get("digest")):
            gone.append(r.get("version"))
        else:
            keep.append(r)
    st["rejected"] = keep
    b = st.get("backoff")
    if b and (what is None or what in (b.get("version"), b.get("digest"))):
        st["backoff"] = None
    st["trials"] = None
    return gone


def forget_rejected(release=None):
    # ota.forget()
    st = state.load()
    gone = forget(st, release)
    state.save(st)
    return gone
