# The `esp32` module of the simulated ESP32 (unix board): esp32.Partition with the real API
# (MicroPython ports/esp32/esp32_partition.c) over the file-backed flash of flash.py.
# It shadows nothing on the unix port (which has no esp32 module); the simulator puts this
# folder on MICROPYPATH and names the running slot in MPOTA_RUNNING.
import os
import idf
from flash import flash, SECTOR


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=4096):
        # id: Partition.RUNNING, Partition.BOOT, a label, or (internally) a partition tuple.
        if isinstance(id, tuple):
            found = [id]
        elif id == Partition.RUNNING:
            label = os.getenv("MPOTA_RUNNING")
            found = idf.find(idf.TYPE_APP, 0xFF, label)
        elif id == Partition.BOOT:
            found = [_boot_partition()]
        else:
            found = idf.find(0xFF, 0xFF, id) or [p for p in idf.partitions() if p[4] == id]
        if not found or found[0] is None:
            raise ValueError("partition not found")
        self._p = found[0]
        self.block_size = block_size

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
        import idfimage
        idfimage.verify_image(off, size)
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
