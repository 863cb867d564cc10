# The payload stage of an update, once the payload is in the inactive slot (ota/download.py):
# what is in flash verified, the slot made bootable. Loaded after the download's code is gone
# (see apply.py).
#
# Memory: the update's one 4096-byte block buffer holds each block read back. Nothing holds a
# whole image.
from micropython import const
import hashlib
from ota.errors import OtaError, DEVICE

_IMAGE_MAGIC = const(0xE9)  # ota/image.py's IMAGE_MAGIC (not loaded for the read-back)

_BLOCK = const(4096)


def _log(msg):
    print("ota: " + msg)


def _verify_flash(target, m, mv):
    # Read the slot back and hash exactly the image's bytes: what will boot is what was signed.
    # The image's magic byte is still erased (0xFF): it is hashed as the 0xE9 it must be, then
    # written (a write without erase may only clear bits: 0xFF -> 0xE9) and read back. Only now
    # does the slot hold something a bootloader would take for an app image.
    h = hashlib.sha256()
    left = m.image_size
    block = 0
    while left:
        k = min(_BLOCK, left)
        target.readblocks(block, mv[:k], 0)
        if block == 0:
            if mv[0] != 0xFF and mv[0] != _IMAGE_MAGIC:
                raise OtaError("flash-mismatch", "the slot's first byte is 0x%02x" % mv[0], DEVICE)
            mv[0] = _IMAGE_MAGIC
        h.update(mv[:k])
        left -= k
        block += 1
    if h.digest() != m.image_sha256:
        raise OtaError("flash-mismatch", "slot content differs from the signed image after writing", DEVICE)
    one = mv[:1]
    one[0] = _IMAGE_MAGIC
    target.writeblocks(0, one, 0)
    target.readblocks(0, one, 0)
    if one[0] != _IMAGE_MAGIC:
        raise OtaError("flash-mismatch", "the image's magic byte did not reach the flash", DEVICE)


def _window_closed(o):
    # The maintenance window was open when the manifest stage judged the rollout document, but
    # a download can outlast it (a slow link, a window's last minutes): judged again from the
    # RTC (which NTP set in that stage) before set_boot() and the reset. None if still open.
    import ota
    from ota import clock, window
    try:
        t = clock.rtc()
        if t is None:
            return "no-clock", "the clock was lost during the download"
        for w, jit in o.windows:
            if not window.is_open(w, t, jit):
                return "outside-window", "the window closed during the download"
        return None
    finally:
        clock = window = None
        ota._drop(("ota.clock", "ota.window"))


def install(cfg, st, o, mv, again):
    # The payload is in the slot: ota/download.py has just put it there (a call of its own
    # before this one), or, `again`, an earlier check downloaded and verified it (held by its
    # maintenance window, or a set_boot() that a power cut stopped): then the slot is only read
    # and hashed again below, when it is to be set to boot.
    m, target = o.m, o.target
    label = target.info()[4]
    if again:
        if o.hold:
            return
        _log("%s is in %s already: checking it again" % (m.version, label))
    try:
        _verify_flash(target, m, mv)
    except OtaError:
        st["progress"] = None  # what is in the slot is not the release: the next try starts over
        raise
    # The progress record marks the download complete and verified: a retry (a check inside the
    # maintenance window, a set_boot() cut short) only re-reads and re-hashes the slot.
    st["progress"] = {"digest": o.digest, "slot": label, "done": m.size,
                      "chunk": m.chunks or 0, "verified": 1}
    if not o.hold and getattr(o, "windows", None):
        o.hold = _window_closed(o)
    from ota import state  # not during the download (save_progress)
    if o.hold:  # outside-window (docs/rollout.md): the set_boot() waits for a check inside it
        state.save(st)
        return
    # Remember what we are about to boot before set_boot, so the next boot can tell a
    # confirmation from a rollback, or from a set_boot that power cut short.
    from ota import otadata, slots  # not during the download: that is this stage's peak
    sector = otadata.next_sector(otadata.records())
    st["pending"] = {"digest": o.digest, "version": m.version, "slot": label, "counter": m.counter,
                     "sector": sector, "from": slots.running().info()[4]}
    state.save(st)
    try:
        otadata.erase_sector(sector)
        target.set_boot()
        import ota
        ota._set_to_boot = True  # the reset comes even if the heap runs out below (ota.update())
    except OSError as e:
        # ESP-IDF refused the image we verified (esp_image_verify: e.g. a chip revision outside
        # the image's min/max): it would refuse it every time, so it is not downloaded again.
        st["pending"] = None
        st["progress"] = None
        state.reject(st, o.digest, m.version, "set-boot-failed")
        raise OtaError("set-boot-failed", "esp_ota_set_boot_partition refused %s: %r" % (m.version, e))
    state.record(st, "installed", None, "%s written to %s; rebooting to confirm" % (m.version, label))
    state.save_or_log(st)  # set to boot and "pending" recorded: only this note can be lost
    _log("%s verified in flash and set to boot" % m.version)
