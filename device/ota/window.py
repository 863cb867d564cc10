# Maintenance windows (docs/rollout.md, "Maintenance windows"): a cron expression "M H DOM MON DOW"
# and a duration, in local time = UTC + utc_offset_min (a fixed offset: no daylight-saving rules on
# the device), opened jitter seconds late. The same rules as host_tools/rolloutdoc.py
# (parse_cron, window_open), which tests/test_rollout_device.py checks this module against.
#
# No time.gmtime(): its epoch is 2000 on an ESP32 (ports/esp32 does not set
# MICROPY_EPOCH_IS_1970) and 1970 on the unix port. Dates come from day numbers here, with the
# civil-from-days algorithm (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms"), and only
# day numbers and seconds within a few days are small ints: nothing here needs more than an ESP32's
# 31-bit small int but the Unix time passed in.

_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6))


def _num(s):
    # int() as the host's parse_cron() has it ("+5" and "1_0" are numbers there and here; both
    # refuse what is not ASCII)
    try:
        return int(s)
    except ValueError:
        raise ValueError("cron: %r is not a number" % s)


def _field(f, lo, hi):
    # One cron field as a bytearray of flags, index v - lo: `*`, numbers, `a-b`, `a,b`, `*/n`, `a-b/n`.
    flags = bytearray(hi - lo + 1)
    for part in f.split(","):
        i = part.find("/")
        step = _num(part[i + 1:]) if i >= 0 else 1
        rng = part[:i] if i >= 0 else part
        if rng == "*":
            a, b = lo, hi
        else:
            j = rng.find("-")
            if j >= 0:
                a, b = _num(rng[:j]), _num(rng[j + 1:])
            else:
                a = b = _num(rng)
        if not (lo <= a <= b <= hi and step >= 1):
            raise ValueError("cron field %r is outside %d-%d" % (f, lo, hi))
        for v in range(a, b + 1, step):
            flags[v - lo] = 1
    return flags


def parse(text):
    # (minutes, hours, days of month, months, weekdays, DOM restricted, DOW restricted)
    fields = text.split() if isinstance(text, str) else ()
    if len(fields) != 5:
        raise ValueError("cron %r must have five fields: minute hour day month weekday" % (text,))
    out = [_field(f, r[0], r[1]) for f, r in zip(fields, _RANGES)]
    return out + [fields[2][0] != "*", fields[4][0] != "*"]  # as Vixie cron: "*/2" is unrestricted


def _int(w, key, lo, hi, default):
    v = w.get(key, default)
    if type(v) is not int or not lo <= v <= hi:  # type(): JSON true is not 1 here
        raise ValueError("%s must be a whole number from %d to %d" % (key, lo, hi))
    return v


def check(w):
    # ValueError unless `w` is a window: {"cron", "duration_s" 60-86400, "utc_offset_min"
    # -720-840 (default 0), "jitter_s" 0-86400 (default 0)}
    if not isinstance(w, dict):
        raise ValueError("a window is an object {\"cron\", \"duration_s\", ...}")
    parse(w.get("cron"))
    _int(w, "duration_s", 60, 86400, None)
    _int(w, "utc_offset_min", -720, 840, 0)
    _int(w, "jitter_s", 0, 86400, 0)


def civil(days):
    # (year, month, day) of the day `days` after 1970-01-01 (Hinnant's civil_from_days)
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (m <= 2), m, d


def _day_ok(cron, days):
    _, mon, dom = civil(days)
    if not cron[3][mon - 1]:
        return False
    dom_ok = cron[2][dom - 1]
    dow_ok = cron[4][(days + 4) % 7]  # 1970-01-01 was a Thursday; 0 = Sunday
    if cron[5] and cron[6]:  # both restricted: either is enough, as in cron
        return dom_ok or dow_ok
    return dom_ok and dow_ok


def is_open(w, now, jit=0):
    # True when Unix time `now` is inside the window, opened `jit` seconds late: some start S
    # matching the cron has S + jit <= now < S + jit + duration_s.
    cron = parse(w["cron"])
    dur = w["duration_s"]
    local = now - jit + w.get("utc_offset_min", 0) * 60
    day = local // 86400
    sec = local - day * 86400
    hours = [h for h in range(24) if cron[1][h]]
    mins = [m for m in range(60) if cron[0][m]]
    for back in range(dur // 86400 + 1, -1, -1):
        if not _day_ok(cron, day - back):
            continue
        t = back * 86400 + sec  # seconds from that day's local midnight to now
        for h in hours:
            for m in mins:
                s = h * 3600 + m * 60
                if s <= t < s + dur:
                    return True
    return False
