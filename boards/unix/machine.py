# machine for the simulated ESP32. The unix port's own `machine` has no reset(), WDT or
# deepsleep(); this module, earlier on sys.path, shadows it. What ends the micropython process
# tells the simulator (host_tools/sim/runner.py) what the board does next:
#   reset()        exit 100: a hard reset; the bootloader runs (esp_restart)
#   soft_reset()   exit 103: MicroPython restarts, the bootloader does not run
#   deepsleep(ms)  exit 104: the chip sleeps and wakes through the bootloader's deep-sleep path
# WDT(timeout=ms) is the task watchdog of ports/esp32/machine_wdt.c: once armed it cannot be
# stopped (a second WDT() only changes the timeout); feed() must come within the timeout or the
# simulator resets the board. The simulator watches the file MPOTA_WDT names: its content is the
# timeout, its modification time the last feed.
# RTC().datetime() is ports/esp32/machine_rtc.c's: the 8-tuple (year, month, day, weekday,
# hours, minutes, seconds, microseconds) of the system time, which ESP-IDF keeps in the RTC
# timer across every reset and deep sleep and loses at power-on only ("System Time", ESP-IDF
# API reference). The simulator keeps it in the file MPOTA_RTC: the RTC's offset from the
# host's clock in seconds. runner.py writes it at power-on (the clock starts again at
# 2000-01-01, the ESP32 port's epoch) and leaves it as it is across resets, soft resets and
# deep sleep; datetime(tuple), as ntptime.settime() calls it, rewrites it.
import os
import sys

RESET_EXIT = 100
SOFT_RESET_EXIT = 103
DEEPSLEEP_EXIT = 104

# machine.reset_cause() values of ports/esp32/modmachine.c
PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5


def reset():
    sys.exit(RESET_EXIT)


def soft_reset():
    sys.exit(SOFT_RESET_EXIT)


def deepsleep(ms=0):
    sys.exit(DEEPSLEEP_EXIT)


def reset_cause():
    return int(os.getenv("MPOTA_RESET_CAUSE") or PWRON_RESET)


def unique_id():
    uid = os.getenv("MPOTA_UID")
    if uid:
        from binascii import unhexlify
        return unhexlify(uid)
    return b"\x24\x0a\xc4\x00\x00\x01"


def freq():
    return 160000000


class WDT:
    def __init__(self, id=0, timeout=5000):
        if id != 0:
            raise ValueError
        if timeout <= 0:
            raise ValueError("WDT timeout too short")
        self._timeout = timeout
        self.feed()

    def feed(self):
        path = os.getenv("MPOTA_WDT")
        if path:
            with open(path, "w") as f:
                f.write(str(self._timeout))


_EPOCH_2000 = 946684800  # 2000-01-01T00:00:00Z in Unix seconds: an ESP32's clock at power-on


def _days(y, m, d):
    # days from 1970-01-01 (H. Hinnant's days_from_civil)
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


class RTC:
    def __init__(self, id=0):
        pass

    def _path(self):
        return os.getenv("MPOTA_RTC")

    def _host_now(self):
        import time
        return time.time_ns() / 1e9

    def _offset(self):
        path = self._path()
        try:
            with open(path) as f:
                return float(f.read())
        except (OSError, ValueError, TypeError):
            # no clock file: a board just powered on (outside `mpota sim run`)
            off = _EPOCH_2000 - self._host_now()
            self._write(off)
            return off

    def _write(self, off):
        path = self._path()
        if path:
            with open(path, "w") as f:
                f.write(repr(off))

    def datetime(self, dt=None):
        import time
        if dt is None:
            t = self._host_now() + self._offset()
            s = int(t)
            tm = time.gmtime(s)  # the unix port's epoch is 1970
            # weekday 0 = Monday, as timeutils_seconds_since_epoch_to_struct_time() gives it
            return (tm[0], tm[1], tm[2], tm[6], tm[3], tm[4], tm[5], int((t - s) * 1000000))
        # (year, month, day, weekday (ignored), hours, minutes, seconds, microseconds)
        secs = _days(dt[0], dt[1], dt[2]) * 86400 + dt[4] * 3600 + dt[5] * 60 + dt[6] + dt[7] / 1e6
        self._write(secs - self._host_now())

    def init(self, dt):
        self.datetime(dt)
