# The device's best knowledge of the time, for rollout documents (docs/rollout.md, "Time and
# freshness"): Unix seconds, or None when the clock was never set.
#
#   1. with "ntp" configured, ntptime.settime() first (micropython-lib micropython/net/ntptime:
#      one SNTP request with socket timeout ntptime.timeout, then machine.RTC().datetime(...) in
#      UTC); its failure (no network, timeout, DNS) is only logged;
#   2. machine.RTC().datetime(): (year, month, day, weekday, hours, minutes, seconds,
#      subseconds), ports/esp32/machine_rtc.c, read from gettimeofday(). ESP-IDF keeps that time
#      in the RTC timer across every reset and deep sleep and loses it at power-on only
#      (ESP-IDF "System Time"), when it starts again at 2000-01-01 (MicroPython's ESP32 epoch):
#      a reading before 2024-01-01 is a clock nobody set.
#
# The date tuple is turned into Unix seconds here (days_from_civil), not with time.time() or
# time.mktime(): their epoch is 2000 on an ESP32 (ports/esp32 does not set
# MICROPY_EPOCH_IS_1970; 946684800 s later than 1970) and 1970 on the unix port, and the unix
# port's mktime() takes local time. The never-earlier-than-rollout_seen rule is ota/rollout.py's.
FLOOR = 1704067200  # 2024-01-01T00:00:00Z


def days_from_civil(y, m, d):
    # days from 1970-01-01 to y-m-d (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms")
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def rtc():
    # Unix seconds from machine.RTC, or None if it reads before 2024 (never set) or there is none.
    try:
        import machine
        t = machine.RTC().datetime()
    except (ImportError, AttributeError, OSError):
        return None
    s = days_from_civil(t[0], t[1], t[2]) * 86400 + t[4] * 3600 + t[5] * 60 + t[6]
    return s if s >= FLOOR else None


def now(ntp=None, timeout_s=1):
    if ntp:
        import sys
        try:
            import ntptime
            ntptime.host = ntp
            ntptime.timeout = timeout_s
            ntptime.settime()
        except Exception as e:  # not fatal: the RTC may still know the time (MemoryError too)
            print("ota: ntp %s: %r" % (ntp[:64], e))
        finally:
            ntptime = None
            sys.modules.pop("ntptime", None)  # not ours to keep in the application's heap
    return rtc()
