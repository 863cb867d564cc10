# ntptime for the simulated board: micropython-lib's module (micropython/net/ntptime/ntptime.py,
# frozen into the stock ESP32 firmware by ports/esp32/boards/manifest.py) with its API: `host`,
# `timeout` (seconds), time() (seconds since this MicroPython's epoch: gmtime(0)[0] is 2000 on
# an ESP32, 1970 on the unix port) and settime() (machine.RTC().datetime() in UTC, weekday
# tm[6] + 1 as micropython-lib writes it). Instead of one SNTP exchange over UDP it reads the
# simulator's "network time" (host_tools/sim/runner.py, `mpota sim run --net-time`):
# MPOTA_NET_TIME is its offset from the host's clock in seconds, or "off" when no NTP server
# answers: then time() waits `timeout` seconds and raises OSError(ETIMEDOUT), as the socket's
# recv() with that timeout does.
import os

host = "pool.ntp.org"
timeout = 1
_ETIMEDOUT = 110


def time():
    import time as t
    net = os.getenv("MPOTA_NET_TIME") or "0"
    if net == "off":
        t.sleep(timeout)
        raise OSError(_ETIMEDOUT)
    s = int(t.time_ns() / 1e9 + float(net))
    if t.gmtime(0)[0] == 2000:  # micropython-lib: NTP_DELTA for a 2000 epoch
        s -= 946684800
    return s


def settime():
    s = time()
    import machine
    from time import gmtime
    tm = gmtime(s)
    machine.RTC().datetime((tm[0], tm[1], tm[2], tm[6] + 1, tm[3], tm[4], tm[5], 0))
