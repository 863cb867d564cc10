# The `esp32` module of the simulated ESP32 (unix board): esp32.Partition with the real API
# (MicroPython ports/esp32/esp32_partition.c) over the file-backed flash of flash.py.
# It shadows nothing on the unix port (which has no esp32 module); the simulator puts this
# folder on MICROPYPATH and names the running slot in MPOTA_RUNNING.
import os
import sys
import idf
from flash import flash, SECTOR


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, *block_size, **kw):
        # esp32_partition_make_new(): one or two positional arguments, no keywords (TypeError);
        # an int id other than BOOT or RUNNING is a ValueError, a label that names no partition
        # an OSError(ENOENT) (esp32_partition_new() with part == NULL). block_size is stored as a
        # uint16_t, so 65536 becomes 0, and a block size under 4096 takes a 4 KiB cache from
        # the heap there. (A tuple id is this emulation's own, from find().)
        if kw:
            raise TypeError("function doesn't take keyword arguments")
        if len(block_size) > 1:
            raise TypeError("function expected at most 2 arguments, got %d" % (1 + len(block_size)))
        if isinstance(id, tuple):
            found = [id]
        elif isinstance(id, int):
            if id == Partition.RUNNING:
                found = idf.find(idf.TYPE_APP, 0xFF, os.getenv("MPOTA_RUNNING"))
            elif id == Partition.BOOT:
                found = [_boot_partition()]
            else:
                raise ValueError
        else:
            found = idf.find(idf.TYPE_APP, 0xFF, id) or idf.find(idf.TYPE_DATA, 0xFF, id)
        if not found or found[0] is None:
            raise OSError(2)  # MP_ENOENT
        self._p = found[0]
        bs = block_size[0] if block_size else SECTOR
        if os.getenv("MPOTA_ERASE64") != "1":
            bs &= 0xFFFF  # a firmware changed for 64 KiB erases (see ioctl) also widens this field
        self.block_size = bs
        self._cache = bytearray(SECTOR) if bs < SECTOR else None

    def __eq__(self, other):
        return isinstance(other, Partition) and self._p[2] == other._p[2]

    def __repr__(self):
        t, st, off, size, label = self._p
        return "<Partition type=%d, subtype=%d, address=%d, size=%d, label=%s, encrypted=0>" % (
            t, st, off, size, label)

    @staticmethod
    def find(type=0, subtype=0xFF, label=None, block_size=4096):
        return [Partition(p, block_size) for p in idf.partitions()
                if p[0] == type and (subtype == 0xFF or p[1] == subtype)
                and (label is None or p[4] == label)]

    def info(self):
        t, st, off, size, label = self._p
        return (t, st, off, size, label, False)

    def _addr(self, block_num, offset, n):
        a = block_num * self.block_size + offset
        if a < 0 or a + n > self._p[3]:
            raise OSError(22)  # outside the partition
        return self._p[2] + a

    def readblocks(self, block_num, buf, offset=0):
        flash().read(self._addr(block_num, offset, len(buf)), buf)

    def writeblocks(self, block_num, buf, offset=None):
        # Without offset: erase the blocks, then write (the simple block protocol).
        # With offset: write only; the caller erased before (the extended protocol).
        if offset is None:
            a = self._addr(block_num, 0, len(buf))
            n = (len(buf) + SECTOR - 1) // SECTOR * SECTOR
            self._addr(block_num, 0, n)
            flash().erase(a, n)
        else:
            a = self._addr(block_num, offset, len(buf))
        flash().write(a, buf)

    def ioctl(self, op, arg):
        if op == 1 or op == 2 or op == 3:  # init, deinit, sync
            return 0
        if op == 4:  # block count
            return self._p[3] // self.block_size
        if op == 5:  # block size
            return self.block_size
        if op == 6:  # erase block: esp32_partition_ioctl() erases 4096 bytes, and refuses
            # (-EINVAL) any other block size; a firmware changed to erase a whole block of
            # block_size (MPOTA_ERASE64=1: one 64 KiB block erase command) lets an updater erase
            # 64 KiB at a time
            if self.block_size != SECTOR and os.getenv("MPOTA_ERASE64") != "1":
                return -22
            flash().erase(self._addr(arg, 0, self.block_size), self.block_size)
            return 0
        return None

    def set_boot(self):
        # esp_ota_set_boot_partition(): the image must verify, then otadata is rewritten.
        t, st, off, size, label = self._p
        if t != idf.TYPE_APP:
            raise OSError(-0x102)  # ESP_ERR_INVALID_ARG
        # esp_image_verify(): C on a board, which takes no heap; here loaded for the check alone
        import idfimage
        try:
            idfimage.verify_image(off, size)
        finally:
            del sys.modules["idfimage"]
            idfimage = None
        slots = idf.ota_slots()
        idf.set_boot([s[2] for s in slots].index(off), len(slots))

    def get_next_update(self):
        # esp_ota_get_next_update_partition(): the OTA slot after this one, wrapping around.
        slots = idf.ota_slots()
        offs = [s[2] for s in slots]
        i = offs.index(self._p[2]) if self._p[2] in offs else -1
        return Partition(slots[(i + 1) % len(slots)], self.block_size)

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        idf.mark_running_valid()


def _boot_partition():
    # esp_ota_get_boot_partition(): the slot the active otadata record names, else ota_0.
    slots = idf.ota_slots()
    recs = idf.read_otadata()
    a = idf.active_otadata(recs)
    if a == -1:
        return slots[0]
    return slots[idf.slot_of_seq(recs[a][0], len(slots))]
