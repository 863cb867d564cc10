"""What a `mpota sim run` came to: one dict (printed as text, or as JSON with --json) and whether
the device ended as expected (exit status 0) or not (1).

A run did not end as expected when the board is not idle at its end (stuck at the REPL, hung),
when its last update ended refused, failed or rolled back (ota.status()'s last_result), or when
it does not run the version the caller expected (--expect-version).
"""
from __future__ import annotations

from . import flashtime
from .runner import Boot, PowerCut

# ota.status()["last_result"] values that mean the last update did not happen as it should
# (device/ota/state.py lists them all).
BAD_RESULTS = ("refused", "failed", "rolled-back")

ENDS = {"idle": "idle", "repl": "stopped at the REPL (an uncaught exception, no watchdog armed)",
        "hung": "hung (no watchdog armed)"}


def summarize(name: str, boots: list[Boot], seconds: float, status: dict | None = None,
              cut: PowerCut | None = None, expect_version: str | None = None) -> dict:
    """The run as data: {"device", "end", "ok", "problems", "version", "slot", "boots", "seconds",
    "flash_ops", "power_cut", "last_result", "last_error", "detail", "status"}. `status` is
    ota.status() after the run (None when the board is not idle: nothing can ask it)."""
    last = boots[-1]
    problems = []
    if last.exit != "idle":
        problems.append(f"the board is {ENDS[last.exit]}")
    st = status or {}
    if st.get("last_result") in BAD_RESULTS:
        why = ": ".join(x for x in (st.get("last_error"), st.get("detail")) if x)
        problems.append(f"the last update ended {st['last_result']}" + (f" ({why})" if why else ""))
    if expect_version is not None and last.version != expect_version:
        problems.append(f"expected to end on {expect_version}, runs {last.version}")
    return {
        "device": name,
        "end": last.exit,
        "ok": not problems,
        "problems": problems,
        "version": last.version,
        "slot": last.slot,
        "last_result": st.get("last_result"),
        "last_error": st.get("last_error"),
        "detail": st.get("detail"),
        "seconds": round(seconds, 2),
        "flash_ops": cut.used if cut else None,
        "flash": None if cut is None else {"sector_erases": cut.work[0], "block_erases": cut.work[1],
                                           "bytes_programmed": cut.work[2], "bytes_read": cut.work[3],
                                           "device_seconds": flashtime.seconds(cut.work)},
        "power_cut": None if cut is None or cut.at is None else
        {"at": cut.at, "tear": cut.tear, "fired": cut.fired},
        "boots": [{"number": b.number, "start": b.start, "slot": b.slot, "version": b.version,
                   "behavior": b.behavior, "exit": b.exit} for b in boots],
        "status": status,
    }


def describe(s: dict) -> list[str]:
    """The summary as the lines `mpota sim run` prints."""
    lines = [f"sim: {s['device']} {ENDS[s['end']]} after {len(s['boots'])} boot(s) in {s['seconds']:.1f} s, "
             f"running {s['version']} from {s['slot']}"
             + (f"; last update: {s['last_result']}" if s["last_result"] else "")]
    pc = s["power_cut"]
    if pc:
        lines.append(f"sim: power cut at flash operation {pc['at']}{' (torn)' if pc['tear'] else ''}: "
                     + ("done" if pc["fired"] else f"not reached (the run did {s['flash_ops']} flash operations)"))
    elif s["flash_ops"]:
        lines.append(f"sim: {s['flash_ops']} flash operations (erase or write): --cut-at 1..{s['flash_ops']} "
                     "cuts the power at one of them")
    fl = s.get("flash")
    if fl and (fl["sector_erases"] or fl["block_erases"]):
        t = fl["device_seconds"]
        lines.append(f"sim: on a real chip this flash work takes about {t['total']:.1f} s: erase {t['erase']:.1f} s "
                     f"({fl['sector_erases']} sector and {fl['block_erases']} block erases), program "
                     f"{t['program']:.1f} s, read {t['read']:.1f} s ({flashtime.W25Q32JV.name}; docs/simulator.md)")
    for p in s["problems"]:
        lines.append(f"sim: not as expected: {p}")
    if s["end"] != "idle":
        lines.append(f"sim: the next `mpota sim run {s['device']}` cycles the power, as a person would have to")
    return lines
