"""`mpota deploy`: put the agent, its config and a main.py on a board running MicroPython.

Everything goes through mpremote, run as a command (its CLI is its stable interface; the
Python classes behind it change between releases), in two sessions:

  1. probe: `mpremote connect PORT resume exec PROBE` prints one JSON line: sys.platform, the
     MCU name, the .mpy version and native architecture (sys.implementation._mpy), the unique
     id, and whether main.py / ota_config.json exist. This picks the board definition (or
     checks --board) and the .mpy architecture, before anything is written.
  2. copy: `mpremote connect PORT resume exec CLEAN + fs cp -r STAGE/lib : + fs cp ... : [+ exec
     STATUS] [+ reset]`. CLEAN removes files under lib/ota that the new agent does not have (a
     stale ota/x.py would shadow x.mpy). mpremote skips files whose SHA-256 on the board already
     matches ("Up to date"), so a second deploy copies nothing but what changed.

`resume` (no soft reset first) works the same on a board and on the simulator's REPL bridge
(`mpota sim repl`): mpremote interrupts whatever runs with Ctrl-C, then copies.

Files are staged first in STAGE (default build/deploy/<board>/): lib/ota/*.mpy compiled by
mpy-cross for the board's architecture, ota_config.json, main.py and, with --wifi, wifi.json.
`--dry-run` stops there and prints the mpremote command lines.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import BOARDS_DIR, DEVICE_DIR, MpotaError, deviceconfig, devicepkg
from .sim.device import board_info

# sys.implementation._mpy >> 10: MicroPython's MP_NATIVE_ARCH_* numbering (py/persistentcode.h).
NATIVE_ARCHS = (None, "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp",
                "armv7emdp", "xtensa", "xtensawin", "rv32imc", "rv64imc")
MPY_VERSION = 6          # what mpy-cross writes; a board must load this .mpy version
MPREMOTE_TIMEOUT_S = 300

PROBE = """\
import sys, os, json
try:
    import machine, binascii
    uid = binascii.hexlify(machine.unique_id()).decode()
except Exception:
    uid = ""
def _has(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False
def _frozen():
    # an `ota` whose __file__ is not on the filesystem was frozen into the firmware (frozen
    # modules are named without ".frozen/": py/builtinimport.c); '.frozen' precedes '/lib' in
    # sys.path, so it is the agent that runs, whatever lib/ota holds
    try:
        import ota
    except ImportError:
        return ""
    f = getattr(ota, "__file__", "") or "ota"
    return "" if _has(f) else f
sys.platform == "linux" or os.chdir("/")
print("MPOTA-PROBE " + json.dumps({"platform": sys.platform, "machine": sys.implementation._machine,
    "version": ".".join(str(v) for v in sys.implementation.version[:3]),
    "mpy": getattr(sys.implementation, "_mpy", 0), "uid": uid,
    "main": _has("main.py"), "config": _has("ota_config.json"), "frozen": _frozen()}))
"""

# The unix port (the simulator) keeps the device filesystem in its working directory; a board
# keeps it at /. Make lib/ota (so that `cp -r .../ota :lib` copies into it) and remove what the
# new agent does not have.
CLEAN = """\
import sys, os
sys.platform == "linux" or os.chdir("/")
keep = {keep}
for d in ("lib", "lib/ota"):
    try:
        os.mkdir(d)
    except OSError:
        pass
names = os.listdir("lib/ota")
for n in names:
    if n not in keep:
        os.remove("lib/ota/" + n)
        print("removed stale lib/ota/" + n)
"""

STATUS = """\
import sys, json
for k in list(sys.modules):
    if k == "ota" or k.startswith("ota."):
        del sys.modules[k]
import ota
print("MPOTA-STATUS " + json.dumps(ota.status()))
"""


class DeployError(MpotaError):
    pass


# sys.implementation._machine of boards whose MICROPY_BOARD_STARTUP calls
# esp_ota_mark_app_valid_cancel_rollback() (ports/esp32/boards/*/board_init.c)
BOARDS_THAT_CONFIRM = ("Arduino Nano ESP32",)

ROLLBACK_WARNINGS = {
    "no-rollback": "the board's bootloader does not roll back an unconfirmed image (built without "
                   "CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE): the agent rolls back after a failed health check "
                   "or a second unconfirmed start, but an image that crashes before main.py cannot be undone",
    "board-confirms": "the board confirms every image at start-up, before main.py: the agent still runs the "
                      "health check and rolls back itself, but an image that crashes before main.py cannot be "
                      "undone",
}


def rollback_warning(probe: "Probe | None", status: dict | None) -> str | None:
    """What deploy must tell the user about this board's rollback, or None (error codes in
    docs/error-codes.md: no-rollback, board-confirms)."""
    code = (status or {}).get("rollback")
    if code in ROLLBACK_WARNINGS:
        return f"{code}: {ROLLBACK_WARNINGS[code]}"
    if probe is not None and probe.confirms_at_boot:
        return f"board-confirms: {ROLLBACK_WARNINGS['board-confirms']}"
    return None


@dataclass
class Probe:
    platform: str
    machine: str
    version: str
    mpy: int
    uid: str = ""
    main: bool = False
    config: bool = False
    frozen: str = ""  # the frozen agent's __file__ ("ota/__init__.py"), "" when not frozen

    @property
    def arch(self) -> str | None:
        i = (self.mpy >> 10) & 0xF
        return NATIVE_ARCHS[i] if i < len(NATIVE_ARCHS) else None

    @property
    def mpy_version(self) -> int:
        return self.mpy & 0xFF

    @property
    def chip(self) -> str | None:
        """'esp32', 'esp32s3', ... from "Generic ESP32S3 module with ESP32S3"; None elsewhere."""
        if self.platform != "esp32":
            return None
        m = re.search(r"with (ESP32\w*)\s*$", self.machine)
        return m.group(1).lower() if m else "esp32"

    @property
    def confirms_at_boot(self) -> bool:
        """Boards whose start-up code marks every new image valid before main.py runs, so the
        bootloader never rolls one back (ARDUINO_NANO_ESP32's board_init.c)."""
        return any(name in self.machine for name in BOARDS_THAT_CONFIRM)

    def describe(self) -> str:
        where = self.chip.upper() if self.chip else f"{self.platform} (unix port)"
        return (f"{where}, MicroPython {self.version}, .mpy v{self.mpy_version}"
                f" {self.arch or 'bytecode only'}")


@dataclass
class Staged:
    board: str
    info: dict
    dir: Path
    agent: list[Path]
    root_files: list[Path]
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.agent + self.root_files)


# ---- mpremote ---------------------------------------------------------------------------------
def mpremote_argv() -> list[str]:
    """How to run the mpremote that is installed with mpota (same interpreter)."""
    return [sys.executable, "-m", "mpremote"]


def run_mpremote(args: list[str], port: str, echo=None, timeout=MPREMOTE_TIMEOUT_S) -> str:
    """Run `mpremote ARGS`; returns its stdout. Output lines are passed to echo as they come."""
    import threading
    proc = subprocess.Popen(mpremote_argv() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace")
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if echo and not line.startswith(("MPOTA-PROBE ", "MPOTA-STATUS ")):
                echo(line.rstrip("\n"))
        err = proc.stderr.read()
        rc = proc.wait()
    finally:
        timer.cancel()
    if rc and not timer.is_alive() and rc < 0:
        raise DeployError(f"mpremote did not finish within {timeout} s on {port}",
                          hint="is the board stuck? press RESET and try again")
    if rc:
        raise _mpremote_error(port, "".join(out), err)
    return "".join(out)


def _mpremote_error(port: str, out: str, err: str) -> DeployError:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else (out.strip().splitlines() or ["no output"])[-1]
    if "failed to access" in err or "could not open port" in err.lower() or "ConnectionRefused" in err:
        return DeployError(f"mpremote could not open {port}: {last}",
                           hint="check the port (mpremote connect list shows serial ports); close other "
                                "programs using it (a serial monitor, another mpremote); for the "
                                "simulator start `mpota sim repl NAME --port N` and use socket://127.0.0.1:N")
    if "raw repl" in err.lower() or "raw repl" in out.lower():
        return DeployError(f"mpremote could not get a MicroPython prompt on {port}: {last}",
                           hint="is MicroPython running on the board (flash it with `mpota flash`)? "
                                "press RESET and try again")
    if "Traceback" in err or "Traceback" in out:
        return DeployError(f"the board raised an exception: {last}")
    return DeployError(f"mpremote failed on {port}: {last}")


def _marked(out: str, marker: str) -> dict:
    what = marker.split("-")[1].lower()
    for line in out.splitlines():
        if line.startswith(marker + " "):
            try:
                answer = json.loads(line[len(marker) + 1:])
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                raise DeployError(f"the board's answer to the {what} request was garbled: {line[:80]!r}",
                                  hint="try again; if it persists, press RESET (noise on the serial line?)")
            return answer
    raise DeployError(f"the board did not answer the {what} request",
                      hint="is this a MicroPython board? try `mpremote connect PORT repl`")


def probe(port: str) -> Probe:
    out = run_mpremote(["connect", port, "resume", "exec", PROBE], port)
    return parse_probe(_marked(out, "MPOTA-PROBE"))


def parse_probe(answer: dict) -> Probe:
    """The PROBE script's answer as a Probe, checked field by field."""
    declared = {f.name: f for f in dataclasses.fields(Probe)}
    types = typing.get_type_hints(Probe)
    fields = {k: v for k, v in answer.items() if k in declared}
    bad = [k for k, v in fields.items() if not isinstance(v, types[k])]
    missing = [k for k, f in declared.items() if k not in fields and f.default is dataclasses.MISSING]
    if bad or missing:
        raise DeployError(f"the board's answer to the probe is not what mpota's probe prints "
                          f"({', '.join(bad + missing)})", hint="try again; if it persists, press RESET")
    return Probe(**fields)


# ---- which board ------------------------------------------------------------------------------
def _boards() -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(BOARDS_DIR.glob("*/board.json"))}


def choose_board(pr: Probe, board: str | None, source: bool = False) -> str:
    """The board definition for what the probe found; checks an explicit --board against it."""
    boards = _boards()
    if pr.platform == "linux":
        fits = [n for n, b in boards.items() if b.get("emulates")]
        what = "the unix port (the simulator)"
    elif pr.platform == "esp32":
        fits = [n for n, b in boards.items() if b["chip"] == pr.chip and not b.get("emulates")]
        what = f"an {pr.chip.upper()}"
    else:
        raise DeployError(f"the board runs MicroPython for {pr.platform!r}; mpota supports ESP32 chips",
                          hint="boards: " + ", ".join(boards))
    if board:
        if board not in boards:
            raise DeployError(f"unknown board {board!r}", hint="known boards: " + ", ".join(boards))
        if board not in fits:
            raise DeployError(f"the board on the port is {what}; board {board} is for "
                              f"{boards[board].get('emulates') and 'the simulator' or boards[board]['chip']}",
                              hint=f"use --board {fits[0]}" if fits else "no board definition in boards/ fits it")
        name = board
    elif not fits:
        raise DeployError(f"no board definition in boards/ is for {what}", hint="add one, or give --board")
    else:
        name = pr.chip if pr.chip in fits else fits[0]
    arch = boards[name]["mpy_arch"]
    if not source:
        if pr.mpy_version != MPY_VERSION:
            raise DeployError(f"the board loads .mpy version {pr.mpy_version}; mpy-cross writes {MPY_VERSION}",
                              hint="update MicroPython on the board (v1.19+), or deploy .py sources with --source")
        if pr.arch and pr.arch != arch:
            raise DeployError(f"the board's native architecture is {pr.arch}; board {name} compiles for {arch}",
                              hint="check --board, or deploy .py sources with --source")
    return name


# ---- staging ----------------------------------------------------------------------------------
STAGE_MARK = ".mpota-stage"  # not copied to the board: copy_args() names what it copies

def example_main(board: str) -> Path:
    own = BOARDS_DIR / board / "main.py"
    return own if own.is_file() else DEVICE_DIR / "examples" / "main.py"


def stage(stage_dir: Path, board: str, config: dict, *, main: Path | None, wifi: tuple[str, str] | None = None,
          source: bool = False, ca: bytes | None = None, frozen: bool = False) -> Staged:
    """Stage what goes to the board; with `frozen` (the firmware has the agent frozen in: it
    runs from flash and costs no heap for its code) no agent file is staged."""
    info = board_info(board)
    stage_dir = Path(stage_dir)
    if stage_dir.exists():
        # it is emptied first: only if an earlier deploy made it (--stage may name any directory)
        ours = (stage_dir / STAGE_MARK).exists() or (  # or staged before the mark existed
            (stage_dir / "lib" / "ota").is_dir() and (stage_dir / "ota_config.json").is_file())
        if not stage_dir.is_dir() or (any(stage_dir.iterdir()) and not ours):
            raise DeployError(f"{stage_dir} exists and is not a staging directory of mpota deploy",
                              hint="give --stage a new or empty directory (it is emptied on every deploy)")
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    (stage_dir / STAGE_MARK).write_text("staged by mpota deploy; emptied by the next one\n")
    agent = [] if frozen else devicepkg.install_agent(stage_dir / "lib", arch=None if source else info["mpy_arch"],
                                                      source=source)
    root = deviceconfig.write(stage_dir / "ota_config.json", config, ca=ca)
    if main is not None:
        try:
            shutil.copyfile(main, stage_dir / "main.py")
        except OSError as e:
            raise DeployError(f"cannot read {main}: {e.strerror}") from None
        root.append(stage_dir / "main.py")
    if wifi:
        path = stage_dir / "wifi.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"ssid": wifi[0], "password": wifi[1]}, f)
        root.append(path)
    return Staged(board, info, stage_dir, agent, root)


def load_config(path: Path) -> tuple[dict, bytes | None]:
    """An ota_config.json written by `mpota config`, and the CA certificate it names (written next
    to it by `mpota config --ca`), if any."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DeployError(f"cannot read config {path}: {e}",
                          hint="write one with: mpota config --pub keys/release.pub --server URL") from None
    if not isinstance(cfg, dict) or not cfg.get("server") or not cfg.get("pubkeys"):
        raise DeployError(f"{path} is not an ota_config.json (no server or pubkeys)")
    ca = None
    if cfg.get("ca"):
        name = cfg["ca"]
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise DeployError(f"{path}: \"ca\" must name a file next to it, not {name!r}")
        ca = deviceconfig.load_ca(Path(path).parent / name)
    return cfg, ca


# ---- the mpremote command lines ---------------------------------------------------------------
def copy_args(port: str, st: Staged, *, status: bool, reset: bool) -> list[str]:
    keep = sorted(p.name for p in st.agent)
    # Destinations are spelled out: mpremote copies *into* a destination directory that exists
    # (lib/ota -> :lib, made by CLEAN) and `:` alone does not stat on every port.
    args = ["connect", port, "resume", "exec", CLEAN.format(keep=json.dumps(keep))]
    if st.agent:  # a frozen agent: CLEAN removes the copy in lib/ota it shadows, nothing is copied
        args += ["+", "fs", "cp", "-r", str(st.dir / "lib" / "ota"), ":lib"]
    for p in st.root_files:
        args += ["+", "fs", "cp", str(p), ":" + p.name]
    if status:
        args += ["+", "exec", STATUS]
    if reset:
        args += ["+", "reset"]
    return args


def shell_line(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["mpremote", *args])


def copy(port: str, st: Staged, *, status: bool, reset: bool, echo=print) -> tuple[dict | None, str]:
    out = run_mpremote(copy_args(port, st, status=status, reset=reset), port, echo=echo)
    return (_marked(out, "MPOTA-STATUS") if status else None), out
