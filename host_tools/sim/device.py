"""Create and load simulated devices: a directory with the flash image, the filesystem and a
little metadata.

    devices/<name>/device.json   board, heap, hardware (chip revision, bootloader build), the slot
                                 the last boot ran (for `sim status`)
    devices/<name>/flash.bin     4 MiB SPI flash laid out from boards/unix/partitions.csv
    devices/<name>/fs/           the device filesystem: main.py, ota_config.json, lib/ota/
    devices/<name>/lock          held (fcntl) by the command using the device: its PID and name
    devices/<name>/fleet.secret  its fleet report secret (hex, mode 0600), with `sim create --fleet`

A simulated device is a set of files that one command at a time may use: `sim run`, `sim
status`, a `sim repl` session, `sim delete` and `sim create --force` take the lock (in_use);
a second one is refused with the PID of the first.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import BOARDS_DIR, MpotaError, deviceconfig, devicepkg, espimage, partitions, read_input

FLASH_SIZE = 4 * 1024 * 1024
# The smallest heap an update is published to need beside the simulator's own main.py (guard,
# the simulated firmware's start-up, confirm: about 20 KiB the "application" holds), README and
# docs/memory.md: the tests install at it (tests/test_memory.py, tests/test_availability.py).
# 4 KiB above the lowest heap at which they all passed (80K, 2026-12-01): the smallest heap
# moves by a KiB or two with the heap's layout. A simulated device runs with 128K unless told
# otherwise.
HEAP_FLOOR = "84K"
DEFAULT_ROOT = Path("devices")

# How the simulated board differs from a stock ESP32 with MicroPython's OTA firmware:
#   chip_rev        efuse_hal_chip_revision(): major * 100 + minor (300 = v3.0)
#   rollback        "on": CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE in bootloader and firmware (stock);
#                   "off": in neither (set_boot writes UNDEFINED records, nothing is put on trial);
#                   "bootloader-off": a bootloader built without it under a firmware built with it
#                   (records stay NEW after the boot)
#   board_confirms  the board's start-up code marks every image valid before main.py runs (as
#                   ARDUINO_NANO_ESP32's board_init.c does)
#   fs              the device's filesystem: "host" (a directory, devices/NAME/fs/), or "littlefs"
#                   or "fat": a real VfsLfs2 / VfsFat in the flash's vfs partition, as the ESP32
#                   port mounts it, whose every write the power-loss sweep can cut (boards/unix/simfs.py)
#   erase64         the firmware's Partition.ioctl(6) erases a whole block of block_size (one 64 KiB
#                   block erase command); stock MicroPython (esp32_partition.c, v1.25 to v1.29)
#                   refuses any block size but 4096, so an updater erases 4 KiB sectors
HARDWARE = {"chip_rev": 300, "rollback": "on", "board_confirms": False, "fs": "host", "erase64": False}
ROLLBACK_MODES = ("on", "off", "bootloader-off")
FS_KINDS = ("host", "littlefs", "fat")
FS_FILES = ("boot.py", "main.py", "ota_config.json", "ca.der")  # what create puts on the filesystem
FLEET_SECRET = "fleet.secret"  # the device's fleet report secret, kept for `mpota fleet register`


@dataclass
class SimDevice:
    name: str
    path: Path
    board: str = "unix"
    heap: str = "128K"
    running: dict = field(default_factory=dict)
    hardware: dict = field(default_factory=lambda: dict(HARDWARE))

    @property
    def flash(self) -> Path:
        return self.path / "flash.bin"

    @property
    def fs(self) -> Path:
        return self.path / "fs"

    @property
    def board_dir(self) -> Path:
        return BOARDS_DIR / self.board

    @property
    def platform_dir(self) -> Path:
        """The board's emulation modules, compiled to .mpy so that they cost the heap what
        they must and no compile-time garbage (on a real ESP32 this is C outside the heap)."""
        return self.path / "platform"

    def hardware_env(self) -> dict:
        """What boards/unix reads about the simulated chip and its build (see HARDWARE)."""
        hw = dict(HARDWARE, **self.hardware)
        return {"MPOTA_CHIP_REV": str(hw["chip_rev"]), "MPOTA_ROLLBACK": hw["rollback"],
                "MPOTA_BOARD_CONFIRMS": "1" if hw["board_confirms"] else "0", "MPOTA_FS": hw["fs"],
                "MPOTA_ERASE64": "1" if hw["erase64"] else "0",
                "MPOTA_UID": hashlib.sha256(self.name.encode()).hexdigest()[:12]}

    def save(self) -> None:
        meta = {"name": self.name, "board": self.board, "heap": self.heap, "hardware": self.hardware,
                "running": self.running}
        tmp = self.path / "device.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        tmp.replace(self.path / "device.json")


def board_info(board: str) -> dict:
    path = BOARDS_DIR / board / "board.json"
    if not path.is_file():
        known = ", ".join(sorted(p.parent.name for p in BOARDS_DIR.glob("*/board.json")))
        raise MpotaError(f"unknown board {board!r}", hint=f"known boards: {known}")
    return json.loads(path.read_text())


def check_name(name: str) -> str:
    """A device name is one directory under the root: never '..', a path, or empty (create
    --force removes the directory it names)."""
    ok = name and len(name) <= 64 and name[0].isalnum() and ".." not in name and all(
        c.isalnum() or c in "-_." for c in name)
    if not ok:
        raise MpotaError(f"{name!r} is not a device name",
                         hint="letters, digits, '-', '_' and '.', starting with a letter or digit, e.g. dev1")
    return name


def load(name: str, root: Path = DEFAULT_ROOT) -> SimDevice:
    path = Path(root) / check_name(name)
    try:
        meta = json.loads((path / "device.json").read_text())
    except (OSError, ValueError):
        where = Path(root).resolve()
        raise MpotaError(f"no simulated device {name!r} in {where}/ (--root {root})",
                         hint=f"create it with: mpota sim create {name} --pub KEY.pub --server URL --firmware FW.bin; "
                              f"if it lives elsewhere, give --root DIR (`mpota sim list --root DIR` lists a root's "
                              "devices)") from None
    dev = SimDevice(name, path, meta.get("board", "unix"), meta.get("heap", "128K"), meta.get("running") or {},
                    dict(HARDWARE, **(meta.get("hardware") or {})))
    try:
        size = dev.flash.stat().st_size
    except OSError:
        size = None
    if size != FLASH_SIZE:
        raise MpotaError(f"{dev.flash} is {'missing' if size is None else f'{size} bytes'}, not the "
                         f"{FLASH_SIZE >> 20} MiB of flash the simulator lays out: the device's files are damaged",
                         hint=f"make it again: mpota sim create {name} --force ...")
    return dev


LOCK_NAME = "lock"


class DeviceBusy(MpotaError):
    """Another process uses the simulated device."""


@contextmanager
def in_use(dev: SimDevice, what: str):
    """Hold the device for `what` (e.g. "mpota sim run") while the block runs; DeviceBusy with the
    holder's PID if another process holds it. An fcntl lock: it ends with the process that
    holds it, however that process ends."""
    path = dev.path / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise busy_error(dev, path) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {what}\n".encode())
        yield dev
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


def busy_error(dev: SimDevice, lock: Path) -> DeviceBusy:
    try:
        pid, _, what = lock.read_text().strip().partition(" ")
    except OSError:
        pid, what = "", ""
    holder = f"PID {pid} ({what})" if pid.isdigit() else "another process"
    return DeviceBusy(f"simulated device {dev.name!r} ({dev.path.resolve()}) is in use by {holder}",
                      hint="a simulated device is its files: wait until that command ends, or stop it "
                           + (f"(kill {pid}) " if pid.isdigit() else "") + "and try again")


@contextmanager
def opened(name: str, root: Path, what: str):
    """The device `name`, loaded while holding it for `what` (see in_use)."""
    dev = load(name, root)
    with in_use(dev, what):
        yield load(name, root)


def layout_flash(path: Path, table: list[partitions.Partition], firmware: bytes, table_offset=0x8000) -> None:
    """Erased flash (0xFF) with the partition table and the firmware in the first OTA slot."""
    slot = next((p for p in table if p.is_ota_slot), None)
    if slot is None:
        raise MpotaError("partition table has no OTA app slot")
    if len(firmware) > slot.size:
        raise MpotaError(f"firmware is {len(firmware)} bytes; slot {slot.label} holds {slot.size}")
    flash = bytearray(b"\xff" * FLASH_SIZE)
    binary = partitions.to_binary(table)
    flash[table_offset:table_offset + len(binary)] = binary
    flash[slot.offset:slot.offset + len(firmware)] = firmware
    path.write_bytes(flash)


def create(name: str, pubkeys: list[Path], server: str, firmware: Path, *, root: Path = DEFAULT_ROOT,
           board: str = "unix", heap: str = "128K", source: bool = False, force: bool = False,
           device_id: str | None = None, mirrors: list[str] = (), aes_keys: list[Path] = (),
           ca: Path | None = None, hardware: dict | None = None, fleet: dict | None = None,
           announce: bool = False, rollout: dict | None = None) -> SimDevice:
    """`fleet`: the fleet server entry of its config (fleetprov.config_entry); its secret is also
    kept as devices/NAME/fleet.secret (mode 0600), for `mpota fleet register`. `rollout`: the
    rollout settings (deviceconfig.rollout_settings: rollout keys, groups, ntp, window)."""
    check_name(name)
    info = board_info(board)
    ca_der = deviceconfig.load_ca(ca) if ca is not None else None
    config = deviceconfig.make(pubkeys, server, board=info.get("board_id", board), chip=info["chip"],
                               device_id=device_id or name, mirrors=mirrors, aes_keys=aes_keys, ca=ca_der,
                               fleet=fleet, announce=announce, rollout=rollout)
    fw = read_input(firmware, "firmware", hint="make one with: mpota sim firmware fw-1.0.0.bin --version 1.0.0")
    img = espimage.parse(fw)
    if img.chip != info["chip"]:
        raise MpotaError(f"firmware is for {img.chip}, board {board} is {info['chip']}")
    path = Path(root) / name
    if path.exists():
        if not force:
            raise MpotaError(f"{path} already exists", hint="use --force to replace it")
        if not is_sim_device(path):
            raise MpotaError(f"{path.resolve()} exists and is not a simulated device: not replacing it",
                             hint="pick another name or --root, or remove that directory yourself")
    # Built beside its place and renamed into it: a create that fails half-way (a bad key,
    # mpy-cross, a full disk, Ctrl-C) leaves nothing behind, and --force keeps the old device
    # until the new one is complete.
    tmp = Path(root) / f".{name}.creating-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "fs" / "lib").mkdir(parents=True)
        dev = SimDevice(name, tmp, board, heap, hardware=dict(HARDWARE, **(hardware or {})))
        layout_flash(dev.flash, partitions.parse_csv(dev.board_dir / "partitions.csv"), fw)
        for script in ("boot.py", "main.py"):
            if (dev.board_dir / script).exists():
                shutil.copyfile(dev.board_dir / script, dev.fs / script)
        deviceconfig.write(dev.fs / "ota_config.json", config, ca=ca_der)
        if fleet:
            from ..fleetprov import write_secret
            write_secret(tmp / FLEET_SECRET, fleet["secret"])
        devicepkg.install_agent(dev.fs / "lib", arch=info.get("mpy_arch"), source=source)
        dev.platform_dir.mkdir()
        for src in sorted(dev.board_dir.glob("*.py")):
            if src.name not in ("boot.py", "main.py"):
                devicepkg.compile_file(src, dev.platform_dir / (src.stem + ".mpy"), info.get("mpy_arch"))
        dev.save()
        if dev.hardware["fs"] != "host":
            from .runner import fs_format
            fs_format(dev, [dev.fs / f for f in FS_FILES if (dev.fs / f).exists()])
        if path.exists():
            with in_use(SimDevice(name, path), "mpota sim create --force"):
                old = Path(root) / f".{name}.replaced-{os.getpid()}"
                path.rename(old)
            shutil.rmtree(old)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dev.path = path
    return dev


def is_sim_device(path: Path) -> bool:
    """A directory `mpota sim create` made (its device.json names a board), even if damaged."""
    try:
        meta = json.loads((Path(path) / "device.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("board"), str)


def delete(name: str, root: Path = DEFAULT_ROOT) -> Path:
    """Remove the simulated device `name` (only a directory that is one, and not while another
    command uses it); returns the path removed."""
    path = Path(root) / check_name(name)
    if not path.exists():
        raise MpotaError(f"no simulated device {name!r} in {Path(root).resolve()}/ (--root {root})",
                         hint="`mpota sim list` lists the devices there")
    if not is_sim_device(path):
        raise MpotaError(f"{path.resolve()} is not a simulated device (no device.json): not deleting it",
                         hint="only directories made by `mpota sim create` are deleted")
    gone = Path(root) / f".{name}.deleting-{os.getpid()}"
    with in_use(SimDevice(name, path), "mpota sim delete"):
        path.rename(gone)
    shutil.rmtree(gone)
    return path


def list_devices(root: Path = DEFAULT_ROOT) -> list[SimDevice]:
    """The simulated devices under `root` (damaged ones too: their files are what they are)."""
    out = []
    root = Path(root)
    if not root.is_dir():
        return out
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not is_sim_device(path):
            continue
        meta = json.loads((path / "device.json").read_text())
        out.append(SimDevice(path.name, path, meta.get("board", "unix"), meta.get("heap", "128K"),
                             meta.get("running") or {}, dict(HARDWARE, **(meta.get("hardware") or {}))))
    return out
