# File-backed SPI flash for the simulated ESP32 (unix board).
#
# Strict NOR-flash rules, so that code which works here works on a real chip:
#   - erase works on whole 4096-byte sectors and sets every byte to 0xFF; an aligned 64 KiB
#     region is erased with one block erase, as ESP-IDF's esp_flash_erase_region() does;
#   - a write may only clear bits (1 -> 0); setting a bit needs an erase first;
#   - every access stays inside the flash.
# A rule broken is an OSError, never a silent success.
#
# Fault injection for power-loss sweeps: MPOTA_CUT_AT=N makes the N-th erase/write command of
# this process (1-based) the last one: with MPOTA_CUT_TEAR=1 that operation is torn (half of it
# happens), otherwise it does not happen at all; then the power is gone (_power_loss).
# MPOTA_OPS_FILE, when set, receives after every erase or write what the flash did so far:
#   commands  sector-erases  block-erases  bytes-programmed  bytes-read
# (host_tools/sim/flashtime.py turns that into the time a real chip would take).
import os
import sys

SECTOR = 4096
BLOCK = 65536
POWER_LOSS_EXIT = 101

# Small and preallocated, so the emulated flash adds little to the heap the agent is measured
# in (on a real ESP32 this is C code outside the heap): erased data is written, and the bytes
# under a write are checked, 256 bytes at a time.
_PIECE = 256
_FF = b"\xff" * _PIECE


class Flash:
    def __init__(self, path):
        self.f = open(path, "r+b")
        self.f.seek(0, 2)
        self.size = self.f.tell()
        self.n = [0, 0, 0, 0, 0]  # what MPOTA_OPS_FILE receives (above)
        self.cut_at = int(os.getenv("MPOTA_CUT_AT") or 0)
        self.tear = os.getenv("MPOTA_CUT_TEAR") == "1"
        self.ops_file = os.getenv("MPOTA_OPS_FILE")
        self._old = bytearray(_PIECE)  # scratch: the bytes under a write (idfimage.py borrows it)

    def _check(self, addr, n):
        if addr < 0 or n < 0 or addr + n > self.size:
            raise OSError(22)  # EINVAL: outside the flash

    def read(self, addr, buf):
        self._check(addr, len(buf))
        self.n[4] += len(buf)
        self.f.seek(addr)
        self.f.readinto(buf)

    def _count(self):
        # One more command; True when it is the one the power fails at.
        self.n[0] += 1
        if self.ops_file:
            with open(self.ops_file, "w") as f:
                f.write(" ".join(str(x) for x in self.n))
        return self.cut_at and self.n[0] >= self.cut_at

    def _power_loss(self):
        # The power is gone: nothing more runs. Not sys.exit(): its SystemExit would unwind the
        # stack and run `finally:` blocks and `with` exits (a file close that writes the
        # filesystem, a clean-up that erases a block) that a board without power never runs.
        # The process kills itself; the simulator reads that as exit POWER_LOSS_EXIT.
        self.f.flush()
        os.system("kill -KILL $PPID")
        sys.exit(POWER_LOSS_EXIT)  # not reached

    def erase(self, addr, n):
        if addr % SECTOR or n % SECTOR:
            raise OSError(22)  # erase is sector-aligned only
        self._check(addr, n)
        if addr % BLOCK == 0 and n == BLOCK:
            self.n[2] += 1  # one block erase command
        else:
            self.n[1] += n // SECTOR  # a sector erase command each
        cut = self._count()
        if cut and not self.tear:
            self._power_loss()
        if cut:
            n = n // 2  # a torn erase leaves the second half as it was
        self.f.seek(addr)
        while n > 0:
            k = min(n, _PIECE)
            self.f.write(_FF if k == _PIECE else _FF[:k])
            n -= k
        if cut:
            self._power_loss()

    def write(self, addr, data):
        n = len(data)
        self._check(addr, n)
        self._check_bits(addr, data, n)
        self.n[3] += n
        cut = self._count()
        if cut and not self.tear:
            self._power_loss()
        if cut:
            n = n // 2  # torn: only the first half of the bytes reached the flash
        self.f.seek(addr)
        self.f.write(memoryview(data)[:n])
        if cut:
            self._power_loss()

    def _check_bits(self, addr, data, n):
        # A write may only clear bits: data must have no 1 where the flash holds a 0.
        old = self._old
        self.f.seek(addr)
        for base in range(0, n, _PIECE):
            k = min(_PIECE, n - base)
            mv = memoryview(old)[:k]
            self.f.readinto(mv)
            if k == _PIECE and old == _FF:
                continue  # fast path: writing into erased flash
            for i in range(k):
                if data[base + i] & ~old[i] & 0xFF:
                    raise OSError(5)  # EIO: write would set a bit that is not erased

    def flush(self):
        self.f.flush()


_flash = None


def flash():
    # The one flash chip of this simulated device (path from MPOTA_FLASH).
    global _flash
    if _flash is None:
        path = os.getenv("MPOTA_FLASH")
        if not path:
            raise OSError(19)  # ENODEV: the simulator did not say where the flash file is
        _flash = Flash(path)
    return _flash
