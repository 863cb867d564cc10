# The download of an update's payload into the inactive slot: ota.update() runs it as a call
# of its own between the two calls of ota/apply.py, so the payload stage's bookkeeping (its
# decisions, the read-back, set_boot(), the state and its JSON code) is not in the heap while
# the payload comes. ota/raw.py streams a raw payload, ota/payload.py a chunked one (only the
# one it needs is loaded); ota/body.py their HTTP responses.
#
# Memory: the update's one 4096-byte block buffer holds each payload block on its way to flash.
# Nothing holds a whole image.
from micropython import const
import ota

_BLOCK = const(4096)


def _log(msg):
    print("ota: " + msg)


def fetch(buf, begun):
    # The payload of the offer into the slot (resumed where an earlier try stopped) by
    # ota/raw.py or, for a chunked one, ota/payload.py. Returns None, or the exception that
    # stopped it (OtaError, MemoryError, ...) for ota/apply.py to judge.
    st, cfg, o, err = begun
    begun = None
    try:
        # The progress record exists before the download's buffers: made at the first save, it
        # would stay between them (a 1 KiB decompressor window then no longer fits there).
        _track(st, o, "chunk" if o.m.chunks else "done", None)
        o.big = block_eraser(o.target)
        _fetch(cfg, st, o, memoryview(buf))
    except Exception as e:
        return e
    finally:
        o.big = None
    return None


def _fetch(cfg, st, o, mv):
    # The HTTP client is loaded once before the download's code, and forgotten: each connection
    # loads it again (ota.body.get) into the room it left, which the download's code and buffers
    # have not taken (measured: 5-7 KiB less heap for a chunked payload than loading it first
    # beside them, docs/memory.md).
    __import__("ota.http")
    ota._drop(("ota.http", "ota.body", "ota.url"))
    try:
        if o.m.chunks is None:
            from ota.raw import fetch as run
        else:
            from ota.payload import fetch as run
        run(cfg, st, o, mv, o.payload_url)
    finally:
        run = None
        ota._drop(("ota.raw", "ota.payload", "ota.http", "ota.body", "ota.url", "ota.image"))


def first_block(mv, chip_id, version):
    # ota/image.py's check of the image header in mv, with that module loaded for it alone:
    # the first block is one of hundreds.
    from ota.image import check_first_block
    try:
        check_first_block(mv, chip_id, version)
    finally:
        check_first_block = None
        ota._drop(("ota.image",))


def _track(st, o, key, n):
    # The download's position in the state's progress record (key "done": bytes, for
    # ota/raw.py; "chunk": chunks, for ota/payload.py), updated in place: no new object is left
    # between the download's buffers. n None: as recorded for this download, else 0.
    p = st.get("progress")
    if p and len(p) == 3 and key in p and p.get("digest") == o.digest and p.get("slot") == o.target.info()[4]:
        if n is not None:
            p[key] = n
    else:
        st["progress"] = {"digest": o.digest, "slot": o.target.info()[4], key: n or 0}


def save_progress(st, o, key, n):
    # The download's position, saved. ota.state and its JSON code are loaded for each save
    # alone, so the download does not carry them (6 KiB).
    _track(st, o, key, n)
    import gc
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
