# File-backed SPI flash for the simulated ESP32 (unix board).
#
# Strict NOR-flash rules, so that code which works here works on a real chip:
#   - erase works on whole 4096-byte sectors and sets every byte to 0xFF;
#   - a write may only clear bits (1 -> 0); setting a bit needs an erase first;
#   - every access stays inside the flash.
# A rule broken is an OSError, never a silent success.
#
# Fault injection for power-loss sweeps: MPOTA_CUT_AT=N makes the N-th erase/write of this
# process (1-based) the last one: with MPOTA_CUT_TEAR=1 that operation is torn (half of it
# happens), otherwise it does not happen at all; then the process ends with POWER_LOSS_EXIT as
# if the power had failed. MPOTA_OPS_FILE, when set, receives the number of operations done and,
# after a space, how many of them were erases.
import os
import sys

SECTOR = 4096
POWER_LOSS_EXIT = 101

# Small and preallocated, so the emulated flash adds little to the heap the agent is measured
# in (on a real ESP32 this is C code outside the heap): erased data is written, and the bytes
# under a write are checked, 256 bytes at a time.
_PIECE = 256
_FF = b"\xff" * _PIECE


def _env_int(name):
    v = os.getenv(name)
    return int(v) if v else 0


class Flash:
    def __init__(self, path):
        self.path = path
        self.f = open(path, "r+b")
        self.f.seek(0, 2)
        self.size = self.f.tell()
        self.ops = 0
        self.erases = 0
        self.cut_at = _env_int("MPOTA_CUT_AT")
        self.tear = os.getenv("MPOTA_CUT_TEAR") == "1"
        self.ops_file = os.getenv("MPOTA_OPS_FILE")
        self._old = bytearray(_PIECE)  # scratch: the bytes under a write (idf.py borrows it)

    def _check(self, addr, n):
        if addr < 0 or n < 0 or addr + n > self.size:
            raise OSError(22)  # EINVAL: outside the flash

    def read(self, addr, buf):
        self._check(addr, len(buf))
        self.f.seek(addr)
        self.f.readinto(buf)

    def _count(self, erase=False):
        # Returns True when this operation is the one the power fails at.
        self.ops += 1
        self.erases += erase
        if self.ops_file:
            with open(self.ops_file, "w") as f:
                f.write("%d %d" % (self.ops, self.erases))
        return self.cut_at and self.ops >= self.cut_at

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
        cut = self._count(True)
        if cut and not self.tear:
            self._power_loss()
        if cut:
            n = n // 2  # a torn erase leaves the second half as it was
        self.f.seek(addr)
        while n > 0:
            k = min(n, 256)
            self.f.write(_FF if k == 256 else _FF[:k])
            n -= k
        if cut:
            self._power_loss()

    def write(self, addr, data):
        n = len(data)
        self._check(addr, n)
        self._check_bits(addr, data, n)
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
