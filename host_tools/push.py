"""`mpota push RELEASE --port PORT`: install a signed release on a board over its serial link,
for boards with no network in reach (a bench, a factory line, stock firmware in QEMU).

Nothing is trusted on the way: the board runs its own agent, `ota.update(source="serial:")`,
which fetches the manifest and the payload from us instead of an HTTP server (device/ota/link.py)
and puts them through the same pipeline: signature by a provisioned key, board/chip/version/
security counter, SHA-256 of every block, the image read back from flash, set_boot(). An
interrupted push resumes at the next one (the board saves its progress), and the new image is
confirmed or rolled back after the reset as after any update.

The link is MicroPython's raw REPL (docs: "raw REPL"; Ctrl-A, code, Ctrl-D; the board answers
"OK", its output, Ctrl-D, its error output, Ctrl-D, ">"), spoken here over pyserial, so `--port`
takes what mpremote takes: /dev/ttyUSB0, COM3, socket://HOST:PORT (QEMU's serial, `mpota sim
repl`). While the update runs, the board prints requests on lines marked "\\x1eMPOTA " and we
answer on its stdin (see device/ota/link.py):
  GET <path> <start> -> "<status> <length>\\n";  READ <n> -> n bytes;  CLOSE
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from . import MpotaError

MARK = b"\x1eMPOTA "
RESULT = b"RESULT "
PROGRAM = ("import ota, json\n"
           "r = ota.update(reboot=False, source='serial:')\n"
           "print('\\x1eMPOTA RESULT ' + json.dumps(r))\n")
RESET = "import machine\nmachine.reset()\n"


class PushError(MpotaError):
    pass


@dataclass
class Pushed:
    result: dict
    sent: int          # payload and manifest bytes sent
    seconds: float


def release_files(release: Path) -> dict[str, Path]:
    """The files a release is made of: manifest.json and the payload its (signed) body names.
    Only these are ever sent; the board verifies everything it gets."""
    from . import release as rel
    manifest = Path(release) / rel.MANIFEST_NAME
    if not manifest.is_file():
        raise PushError(f"{release} is not a release directory (no {rel.MANIFEST_NAME})",
                        hint="make one with: mpota release FIRMWARE.bin --key KEY --out DIR")
    try:
        env = json.loads(manifest.read_bytes())
        import base64
        body = json.loads(base64.b64decode(env["payload"]))
        name = body["payload"]["url"]
    except (ValueError, KeyError, TypeError) as e:
        raise PushError(f"{manifest} is not an mpota manifest ({e})", hint="check it with: mpota verify") from None
    files = {"/" + rel.MANIFEST_NAME: manifest}
    payload = Path(release) / name
    if "/" not in name and payload.is_file():
        files["/" + name] = payload
    rollout = Path(release) / "rollout.json"  # a device with a rollout role asks for it (docs/rollout.md)
    if rollout.is_file():
        files["/rollout.json"] = rollout
    return files


class RawRepl:
    """MicroPython's raw REPL over a serial port (pyserial; serial_for_url for socket://)."""

    def __init__(self, port: str, baud: int = 115200, timeout: float = 10):
        import serial
        try:
            self.port = serial.serial_for_url(port, baudrate=baud, timeout=0.05)
        except (serial.SerialException, ValueError, OSError) as e:
            raise PushError(f"cannot open {port}: {e}",
                            hint="is the board plugged in and the port free (no mpremote/screen on it)?") from None
        self.timeout = timeout

    def read_until(self, ending: bytes, timeout: float | None = None) -> bytes:
        out, deadline = b"", time.monotonic() + (timeout or self.timeout)
        while not out.endswith(ending):
            if time.monotonic() > deadline:
                raise PushError(f"the board did not answer (waited for {ending!r}; got {out[-80:]!r})",
                                hint="is MicroPython running on that port? try: mpremote connect PORT repl")
            out += self.port.read(max(1, self.port.in_waiting))
        return out

    def enter(self) -> None:
        self.port.write(b"\r\x03\x03")  # stop whatever runs (main.py's loop)
        time.sleep(0.2)
        self.port.reset_input_buffer()
        self.port.write(b"\r\x01")      # raw REPL
        self.read_until(b"raw REPL; CTRL-B to exit\r\n>")

    def start(self, code: str) -> None:
        self.port.write(code.encode() + b"\x04")
        self.read_until(b"OK")

    def leave(self) -> None:
        self.port.write(b"\r\x02")

    def close(self) -> None:
        self.port.close()


def push(release: Path, port: str, baud: int = 115200, timeout: float = 30, reset: bool = False,
         echo=print, stop_after: int | None = None) -> Pushed:
    """Push `release` to the board on `port`; returns what the board's ota.update() returned.
    `stop_after`: stop answering after that many bytes (tests: an interrupted link)."""
    files = release_files(release)
    link = RawRepl(port, baud, timeout)
    t0 = time.monotonic()
    sent = 0
    result = None
    try:
        link.enter()
        link.start(PROGRAM)
        f = None
        buf = b""
        last = time.monotonic()
        while True:
            data = link.port.read(max(1, link.port.in_waiting))
            if data:
                buf += data
                last = time.monotonic()
            elif time.monotonic() - last > timeout:
                raise PushError(f"the board said nothing for {timeout:.0f} s", hint="see its output above")
            while True:
                end = buf.find(b"\x04")
                nl = buf.find(b"\n")
                if nl < 0 and end < 0:
                    break
                if end >= 0 and (nl < 0 or end < nl):
                    # the program ended: its output up to Ctrl-D, then its error output, Ctrl-D
                    if buf[:end].strip():
                        echo(buf[:end].decode(errors="replace").rstrip())
                    rest = buf[end + 1:]
                    if b"\x04" not in rest:
                        rest += link.read_until(b"\x04", timeout)
                    err = rest[:rest.index(b"\x04")].decode(errors="replace").strip()
                    if err:
                        raise PushError("the board raised an exception:\n" + err,
                                        hint="is the mpota agent on the board? deploy it: mpota deploy --port PORT ...")
                    if result is None:
                        raise PushError("the board's update ended without a result", hint="see its output above")
                    return Pushed(result, sent, time.monotonic() - t0)
                line, buf = buf[:nl].rstrip(b"\r"), buf[nl + 1:]
                if not line.startswith(MARK):
                    echo(line.decode(errors="replace"))
                    continue
                req = line[len(MARK):]
                if req.startswith(RESULT):
                    result = json.loads(req[len(RESULT):])
                    continue
                words = req.decode(errors="replace").split()
                if words[:1] == ["GET"] and len(words) == 3 and words[2].isdigit():
                    if f:
                        f.close()
                        f = None
                    path, start = files.get(words[1]), int(words[2])
                    if path is None:
                        link.port.write(b"404 0\n")
                        continue
                    size = path.stat().st_size
                    if start > size:
                        link.port.write(b"416 0\n")
                        continue
                    f = path.open("rb")
                    f.seek(start)
                    link.port.write(b"%d %d\n" % (206 if start else 200, size - start))
                    if words[1].endswith(".json"):
                        echo(f"push: sending {words[1][1:]}")
                    else:
                        echo(f"push: sending {words[1][1:]} from byte {start} of {size}")
                elif words[:1] == ["READ"] and len(words) == 2 and words[1].isdigit() and f:
                    n = int(words[1])
                    if stop_after is not None and sent + n > stop_after:
                        continue  # the link "breaks": the board times out and keeps its progress
                    chunk = f.read(n)
                    link.port.write(chunk)
                    sent += len(chunk)
                elif words[:1] == ["CLOSE"]:
                    if f:
                        f.close()
                        f = None
    finally:
        try:
            if reset and result is not None:
                link.port.write(RESET.encode() + b"\x04")
            else:
                link.leave()
        finally:
            link.close()
