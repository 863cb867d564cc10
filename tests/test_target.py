"""The device scenarios on a real board, or on Espressif's QEMU, when the suite is pointed at one:

    MPOTA_TARGET=/dev/ttyUSB0 make test            # an ESP32 flashed with `mpota flash`
    MPOTA_TARGET=socket://127.0.0.1:5555 make test # qemu-system-xtensa -machine esp32 ... -serial tcp::5555,server
    MPOTA_TARGET_FIRMWARE=ESP32_GENERIC-OTA-....bin  # what the board runs (app or merged image);
                                                     # default: ../shared/firmware's v1.25.0 image
    MPOTA_TARGET_BOARD=esp32                         # its board definition (default esp32)

The board is driven over its console only (mpota deploy, mpota push, mpremote), so it needs no
network: the releases travel over the serial link. Each release is the board's own firmware
with a new version in esp_app_desc_t (espimage.set_version), signed with a key made here; the
main.py deployed here decides health by version, so the same image can pass, fail its health
check, or raise before confirming. The console must survive resets (a UART, QEMU's serial; a
board with native USB drops its port at every reset).

Without MPOTA_TARGET the same scenarios run against the simulator's console (`mpota sim repl`),
which keeps the harness itself tested.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SHARED, SimRepl, tool
from mpota import espimage, flashing, keys, push, release

TARGET = os.environ.get("MPOTA_TARGET")
BOOT_S = 180 if TARGET else 30   # a board's boot, trial and reset, with margin
STAMP = int(time.time()) // 60   # versions newer than any an earlier run installed
READY = "MPOTA-TARGET-READY"
MAIN = f"""\
import ota
ota.guard(8000)
v = ota.status()['version'] or ''
if v.endswith('.4.0'):
    raise RuntimeError('mpota target test: an exception before confirm')
ota.confirm(lambda: not v.endswith('.3.0'), timeout_ms=5000)
print('{READY}', v)
"""


def version(n: int) -> str:
    return f"{STAMP}.{n}.0"


class Target:
    def __init__(self, url, board, base_image, workdir):
        self.url, self.board, self.base, self.dir = url, board, base_image, workdir
        self.key = workdir / "release"
        keys.generate(self.key)

    def mpota(self, *args, timeout=900):
        r = subprocess.run([tool("mpota"), *map(str, args)], capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def release(self, n: int) -> Path:
        img = self.dir / f"fw-{version(n)}.bin"
        img.write_bytes(espimage.set_version(self.base, version(n)))
        out = self.dir / f"rel-{n}"
        release.build(img, out, [keys.load_private(self.key)], board=self.board_id())
        return out

    def board_id(self):
        from mpota.sim.device import board_info
        info = board_info(self.board)
        return info.get("board_id", self.board)

    def reset_and_wait(self, expect: str) -> str:
        """Reset the board through its console and read (without interrupting anything) until
        the deployed main.py says it is done on version `expect`."""
        import serial
        port = serial.serial_for_url(self.url, baudrate=115200, timeout=0.1)
        try:
            port.write(b"\r\x03\x03\r\x01")
            time.sleep(0.3)
            port.write(b"import machine\nmachine.reset()\n\x04")
            out, deadline = b"", time.monotonic() + BOOT_S
            while f"{READY} {expect}".encode() not in out:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the board did not come up on {expect}:\n"
                                         + out.decode(errors="replace")[-3000:])
                out += port.read(4096)
            return out.decode(errors="replace")
        finally:
            port.close()

    def status(self) -> dict:
        r = subprocess.run([tool("mpremote"), "connect", self.url, "resume", "exec",
                            "import ota, json; print('STATUS ' + json.dumps(ota.status()))"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout.split("STATUS ", 1)[1])


def _base_image(board: str) -> bytes:
    path = Path(os.environ.get("MPOTA_TARGET_FIRMWARE") or
                SHARED / "firmware" / "ESP32_GENERIC-OTA-20250415-v1.25.0.bin")
    if not path.is_file():
        pytest.skip(f"MPOTA_TARGET is set but the firmware the board runs is not: {path} "
                    "(set MPOTA_TARGET_FIRMWARE)")
    info = flashing.load_board(board)[0]
    return flashing.split_firmware(path.read_bytes(), info)[2]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    work = tmp_path_factory.mktemp("target")
    if TARGET:
        board = os.environ.get("MPOTA_TARGET_BOARD", "esp32")
        t = Target(TARGET, board, _base_image(board), work)
        repl = None
    else:
        from mpota.sim import device
        base = espimage.build_sim_firmware("0.0.1", size=64 * 1024)
        (work / "fw.bin").write_bytes(base)
        keys.generate(work / "unused")
        dev = device.create("target", [work / "unused.pub"], "http://127.0.0.1:9/", work / "fw.bin",
                            root=work / "devices")
        for p in dev.fs.iterdir():  # a board as `mpota flash` leaves it: no agent, no main.py
            if p.is_file():
                p.unlink()
        repl = SimRepl("target", work / "devices")
        t = Target(repl.url, "unix", base, work)
    (work / "main.py").write_text(MAIN)
    t.mpota("deploy", "--port", t.url, "--pub", f"{t.key}.pub", "--server", "http://127.0.0.1:9/",
            "--board", t.board, "--main", work / "main.py")
    t.reset_and_wait("")  # the deployed main.py runs once on the firmware the board had
    yield t
    if repl:
        repl.stop()


def test_target_installs_confirms_and_keeps_a_pushed_release(target):
    out = target.mpota("push", target.release(1), "--port", target.url)
    assert "ota.update(): installed" in out, out
    target.reset_and_wait(version(1))  # its trial, the confirmation and the reset after it
    st = target.status()
    assert st["version"] == version(1) and st["last_result"] == "confirmed", st
    assert st["slots"][st["slot"]] == "VALID" and st["rollback"] == "bootloader"


def test_target_rolls_back_a_failed_health_check(target):
    good = target.status()["version"]
    target.mpota("push", target.release(3), "--port", target.url)
    target.reset_and_wait(good)  # 3 fails its health check, resets, the bootloader goes back
    st = target.status()
    assert st["version"] == good and st["last_error"] == "health-failed", st
    assert version(3) in st["rejected"]


def test_target_rolls_back_an_exception_before_confirm(target):
    # the exception leaves the board at the REPL; the watchdog that ota.guard() armed resets it
    good = target.status()["version"]
    target.mpota("push", target.release(4), "--port", target.url)
    target.reset_and_wait(good)
    st = target.status()
    assert st["version"] == good and st["last_error"] == "rolled-back", st


def test_target_resumes_an_interrupted_push(target):
    lines = []
    rel = target.release(5)  # built once: a rebuild is another release (its own issue time, digest)
    done = push.push(rel, target.url, echo=lines.append, stop_after=20000, timeout=60)
    assert done.result["error"] in ("network", "too-slow"), lines
    lines.clear()
    done = push.push(rel, target.url, echo=lines.append, timeout=60)
    assert done.result["result"] == "installed" and any("resuming" in x for x in lines), lines
    target.reset_and_wait(version(5))
    assert target.status()["version"] == version(5)
