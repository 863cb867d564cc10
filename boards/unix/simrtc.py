# machine.RTC for the simulated ESP32 (boards/unix/machine.py returns one): ports/esp32/
# machine_rtc.c's RTC. datetime() is the 8-tuple (year, month, day, weekday, hours, minutes,
# seconds, microseconds) of the system time (gettimeofday()), weekday 0 = Monday; datetime(tuple)
# sets it (settimeofday(); the weekday is ignored); init(tuple) is the same. ESP-IDF keeps the
# system time in the RTC timer across every reset and deep sleep and loses it at power-on only
# ("System Time", ESP-IDF API reference): the simulator keeps it in the file MPOTA_RTC, as the
# RTC's offset from the host's clock in seconds. host_tools/sim/runner.py writes it at power-on
# (the clock starts again at 2000-01-01, the ESP32 port's epoch) and leaves it as it is across
# resets, soft resets and deep sleep.
import os

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
        if id != 0:
            raise ValueError

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
