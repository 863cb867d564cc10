# The payload stage of an update: the payload into the inactive slot (ota/raw.py, or
# ota/payload.py for a chunked one: only the one it needs is loaded), what is in flash verified,
# the slot made bootable. Loaded after the manifest stage's code is gone (see apply.py).
#
# Memory: the update's one 4096-byte block buffer holds each payload block on its way to flash,
# then each block read back. Nothing holds a whole image.
from micropython import const
import hashlib
from ota.errors import OtaError, DEVICE

_IMAGE_MAGIC = const(0xE9)  # ota/image.py's IMAGE_MAGIC (not loaded for the read-back)

_BLOCK = const(4096)


def _log(msg):
    print("ota: " + msg)


def save_progress(st):
    # The state file, from the download's code (ota/raw.py, ota/payload.py): ota.state and its
    # JSON code are loaded for each save alone, so the download does not carry them (6 KiB).
    import gc
    import ota
    gc.collect()  # what the last block or chunk left, before the module comes
    from ota import state
    try:
        state.save(st)
    finally:
        state = None
        ota._drop(("ota.state", "ota.jsonfile"))


def block_eraser(target):
    # The target slot as 64 KiB erase blocks, where the firmware erases them: a Partition made
    # with block_size 65536 whose ioctl(6) answers 0. Else None: stock MicroPython (v1.25 to
    # v1.29, esp32_partition.c) keeps block_size in a uint16_t (65536 becomes 0, which also
    # takes a 4 KiB cache from the heap) and its ioctl(6) refuses (-EINVAL) any erase block but
    # 4096 bytes. Asked once per update, before the download holds its buffers, so that cache
    # comes and goes while the heap is least used. A heap without a free 4 KiB for that cache
    # is no reason to fail the update: it erases sector by sector, as stock firmware does.
    try:
        from esp32 import Partition
        big = Partition(target.info()[4], 65536)
        if big.ioctl(5, None) == 65536:
            return big
    except (OSError, TypeError, ValueError, MemoryError):
        pass
    return None


class Slot:
    # Writes the target slot 4 KiB block by block: an erase, then the write. With a block
    # eraser (above), a region of 64 KiB written from its start is erased at once: one block
    # erase instead of 16 sector erases (150 ms for 720 ms on a typical chip: docs/simulator.md),
    # and its blocks are then written without an erase. Only what this process erased is
    # written so: a download resumed in the middle of a region, after a reset or a torn write,
    # erases sector by sector again.
    def __init__(self, part, big):
        self.p = part
        self.big = big
        self.lo = self.hi = 0  # the blocks of the region this process erased at once

    def write(self, block, mv, left):
        # block `block` from mv; `left`: blocks still to write from it on (this one included)
        if self.big and block & 15 == 0 and left > 3 and (block + 16) * _BLOCK <= self.p.info()[3]:
            if self.big.ioctl(6, block >> 4) == 0:
                self.lo, self.hi = block, block + 16
            else:
                self.big = None
        if self.lo <= block < self.hi:
            self.p.writeblocks(block, mv, 0)  # erased with its region
        else:
            self.p.writeblocks(block, mv)  # erases the block, then writes it


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


def _download(cfg, st, o, mv):
    # The payload into the slot (resumed where an earlier try stopped) by ota/raw.py or, for a
    # chunked one, ota/payload.py; their code and the HTTP client are forgotten once it is
    # there: the read-back, the state's saves and set_boot() run without them.
    import ota
    # The HTTP client is loaded once before the download's code, and forgotten: each connection
    # loads it again (ota.body.get) into the room it left, which the download's code and buffers
    # have not taken (measured: 5-7 KiB less heap for a chunked payload than loading it first
    # beside them, docs/memory.md).
    __import__("ota.http")
    ota._drop(("ota.http", "ota.body", "ota.url"))
    try:
        if o.m.chunks is None:
            from ota.raw import fetch
        else:
            from ota.payload import fetch
        fetch(cfg, st, o, mv, o.payload_url)
    finally:
        fetch = None
        o.big = None
        ota._drop(("ota.raw", "ota.payload", "ota.http", "ota.body", "ota.url", "ota.image"))


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


def install(cfg, st, o, mv):
    m, target = o.m, o.target
    label = target.info()[4]
    p = st.get("progress")
    if p and p.get("verified") and p.get("digest") == o.digest and p.get("slot") == label:
        # Downloaded and verified by an earlier check (held by its maintenance window, or a
        # set_boot() that a power cut stopped): only the slot is read and hashed again below,
        # when it is to be set to boot.
        if o.hold:
            return
        _log("%s is in %s already: checking it again" % (m.version, label))
    else:
        o.big = block_eraser(target)
        _download(cfg, st, o, mv)
    try:
        _verify_flash(target, m, mv)
    except OtaError:
        st["progress"] = None  # what is in the slot is not the release: the next try starts over
        raise
    # The progress record marks the download complete and verified: a retry (a check inside the
    # maintenance window, a set_boot() cut short) only re-reads and re-hashes the slot.
    st["progress"] = {"digest": o.digest, "slot": label, "done": m.size,
                      "chunk": len(m.chunks) if m.chunks else 0, "verified": 1}
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
