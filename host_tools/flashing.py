"""`mpota flash`: put a stock MicroPython firmware on a board, with an OTA partition table.

What is written where (ESP-IDF's layout; offsets from boards/<board>/board.json and
partitions.csv):

    bootloader_offset   bootloader            from a merged firmware or --bootloader; else the
                        (0x1000 esp32,        board keeps the one it has
                         0x0 esp32s3/c3)
    0x8000              partition-table.bin   built from partitions.csv (MD5 entry)
    otadata             ota_data_initial.bin  all 0xFF: no OTA record, so the bootloader boots
                                              the first OTA slot (ESP-IDF's own initial otadata)
    ota_0               micropython.bin       the MicroPython application image

Two kinds of firmware file are accepted:
  * an app image (`micropython.bin` of a MicroPython build: starts with the image header and
    has esp_app_desc_t in its first segment);
  * a merged image, as micropython.org publishes them (`ESP32_GENERIC-OTA-…bin`: bootloader,
    partition table and app, meant to be written at the bootloader offset) or a full flash
    dump from 0x0. Its bootloader and app are used; its partition table is replaced by the
    board's OTA table.

Nothing here talks to a board until flash() is called: plan() reads and checks the firmware
(chip, size against every OTA slot), write_files() writes what would be flashed plus
`flash_args`, and esptool_command() is the equivalent esptool command line (`--dry-run`).
"""
from __future__ import annotations

import shlex
import struct
from dataclasses import dataclass, field
from pathlib import Path

from . import MpotaError, espimage, partitions, read_input
from .sim.device import board_info

APP_NAME = "micropython.bin"
TABLE_NAME = "partition-table.bin"
OTADATA_NAME = "ota_data_initial.bin"
BOOTLOADER_NAME = "bootloader.bin"
FLASH_ARGS_NAME = "flash_args"
DEFAULT_BAUD = 460800
ROM_BAUD = 115200


class FlashError(MpotaError):
    pass


@dataclass
class Region:
    offset: int
    name: str          # file name in the output directory
    data: bytes
    what: str          # for people: "bootloader (from the merged image)"


@dataclass
class FlashPlan:
    board: str
    info: dict
    table: list[partitions.Partition]
    kind: str                         # "app" or "merged"
    app: espimage.ImageInfo
    regions: list[Region]
    notes: list[str] = field(default_factory=list)

    @property
    def chip(self) -> str:
        return self.info["chip"]

    def region(self, name: str) -> Region | None:
        return next((r for r in self.regions if r.name == name), None)


def human(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def flash_size_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20}.get(t[-1:], 1)
    return int(t.rstrip("KM")) * mult


# ---- the board: board.json + its OTA partition table -----------------------------------------
def load_board(board: str) -> tuple[dict, list[partitions.Partition]]:
    info = board_info(board)
    if info.get("emulates"):
        real = sorted(p.parent.name for p in info_paths() if not _json(p).get("emulates"))
        raise FlashError(f"board {board!r} is the simulator, not a chip esptool can flash",
                         hint=f"real boards: {', '.join(real)}; the simulator is made by `mpota sim create`")
    from . import BOARDS_DIR
    table = partitions.parse_csv(BOARDS_DIR / board / "partitions.csv")
    slots = [p for p in table if p.is_ota_slot]
    if len(slots) < 2 or not any(p.type == 1 and p.subtype == 0 for p in table):
        raise FlashError(f"boards/{board}/partitions.csv needs two OTA app slots and an otadata partition")
    end = max(p.offset + p.size for p in table)
    if end > flash_size_bytes(info["flash_size"]):
        raise FlashError(f"boards/{board}/partitions.csv ends at 0x{end:x}, beyond the board's "
                         f"{info['flash_size']} flash")
    return info, table


def info_paths():
    from . import BOARDS_DIR
    return sorted(BOARDS_DIR.glob("*/board.json"))


def _json(p: Path) -> dict:
    import json
    return json.loads(p.read_text())


def _otadata(table) -> partitions.Partition:
    return next(p for p in table if p.type == 1 and p.subtype == 0)


# ---- the firmware file: app image or merged image ---------------------------------------------
def image_length(data: bytes, at: int = 0) -> int:
    """Bytes an ESP image (app or bootloader) starting at `at` occupies: header, segments,
    checksum padding and, when the header says so, the appended SHA-256."""
    if len(data) < at + 24 or data[at] != espimage.IMAGE_MAGIC:
        raise FlashError("no ESP image header (magic 0xE9) where an image should start")
    nseg, hash_appended = data[at + 1], data[at + 23] == 1
    pos = at + 24
    for _ in range(nseg):
        if pos + 8 > len(data):
            raise FlashError("ESP image segments run past the end of the file")
        _addr, n = struct.unpack_from("<II", data, pos)
        pos += 8 + n
    pos += 16 - pos % 16  # pad to 16 with the checksum byte last
    if hash_appended:
        pos += 32
    if pos > len(data):
        raise FlashError("ESP image runs past the end of the file (truncated?)")
    return pos - at


def esptool_check(data: bytes, chip: str, what: str) -> None:
    """The image as esptool reads it (an independent reader): header, segments, chip id,
    checksum and appended SHA-256 must all be right."""
    from esptool.bin_image import LoadFirmwareImage
    from esptool.util import FatalError
    try:
        img = LoadFirmwareImage(chip, data)
    except (FatalError, RuntimeError, struct.error) as e:
        raise FlashError(f"esptool does not accept {what}: {e}") from None
    rom_chip_id = img.ROM_LOADER.IMAGE_CHIP_ID
    if img.chip_id != rom_chip_id:
        raise FlashError(f"esptool: {what} has chip id {img.chip_id}; {chip} is {rom_chip_id}")
    if img.checksum != img.calculate_checksum():
        raise FlashError(f"esptool: {what} has a bad checksum (corrupt or truncated file)")
    if img.append_digest and img.stored_digest != img.calc_digest:
        raise FlashError(f"esptool: {what} has a bad appended SHA-256 (corrupt or truncated file)")


def _chip_of(data: bytes, at: int = 0) -> str | None:
    return espimage.CHIP_BY_ID.get(struct.unpack_from("<H", data, at + 12)[0])


def split_firmware(data: bytes, info: dict) -> tuple[str, bytes | None, bytes, list | None]:
    """-> (kind, bootloader or None, app image bytes, the merged image's own partition table)."""
    if espimage.is_esp8266(data):
        raise FlashError(espimage.ESP8266_REFUSAL, hint=espimage.ESP8266_HINT)
    if is_app_image(data):
        return "app", None, data[:image_length(data)], None
    bl_off = int(info["bootloader_offset"], 0)
    pt_off = int(info["partition_table_offset"], 0)
    for base in dict.fromkeys((bl_off, 0)):   # written at the bootloader offset, or a dump from 0
        t = pt_off - base
        if len(data) < t + 32 or data[t:t + 2] != partitions.ENTRY_MAGIC:
            continue
        try:
            embedded = partitions.from_binary(data[t:t + partitions.TABLE_MAX])
        except MpotaError as e:
            raise FlashError(f"merged image: its partition table does not read: {e}") from None
        apps = sorted((p for p in embedded if p.type == 0), key=lambda p: p.offset)
        if not apps or len(data) <= apps[0].offset - base:
            raise FlashError("merged image: its partition table names no app partition inside the file")
        a = apps[0].offset - base
        bl = bl_off - base
        bootloader = data[bl:bl + image_length(data, bl)]
        app = data[a:a + image_length(data, a)]
        return "merged", bootloader, app, embedded
    if data[:1] == bytes([espimage.IMAGE_MAGIC]):
        raise FlashError("this is an ESP image but not an application (no esp_app_desc_t in its first "
                         "segment): a bootloader?", hint="give a bootloader with --bootloader, and the "
                                                         "MicroPython app or merged image as FIRMWARE")
    raise FlashError(f"not an ESP firmware image (first byte 0x{data[0]:02x}, expected 0xe9)" if data
                     else "the firmware file is empty",
                     hint="give the .bin of a MicroPython build (build-*/micropython.bin) or the "
                          "firmware .bin from micropython.org, not an .elf, .hex or .uf2")


def is_app_image(data: bytes) -> bool:
    """An app image starts with the image header, then its first segment's header, then
    esp_app_desc_t (magic 0xABCD5432). A merged image starts with the bootloader (or 0xFF)."""
    return (len(data) > 36 and data[0] == espimage.IMAGE_MAGIC
            and struct.unpack_from("<I", data, 32)[0] == espimage.APP_DESC_MAGIC)


def plan(board: str, firmware: Path, bootloader: Path | None = None) -> FlashPlan:
    """Read and check everything that `mpota flash` would write. Raises FlashError with a hint
    for a firmware that does not fit the board."""
    info, table = load_board(board)
    data = read_input(firmware, "firmware", hint=_download_hint(info), error=FlashError)
    kind, bl, app, embedded = split_firmware(data, info)
    name = Path(firmware).name
    app_chip = _chip_of(app)
    other = [q.parent.name for q in info_paths() if _json(q).get("chip") == app_chip
             and not _json(q).get("emulates")]
    chip_hint = ((f"use --board {other[0]}, or " if other else "use ") + f"a firmware built for {info['chip']}"
                 + (f": {_download_hint(info)}" if _download_hint(info) else ""))
    if app_chip != info["chip"]:
        raise FlashError(f"{name} is firmware for {app_chip or 'an unknown chip'}; board {board} "
                         f"is an {info['chip']}", hint=chip_hint)
    esptool_check(app, info["chip"], f"the app image in {name}")
    try:
        img = espimage.parse(app)
    except espimage.ImageError as e:
        raise FlashError(f"{name}: the app image does not verify: {e}", hint=e.hint) from None
    notes = []
    slots = [p for p in table if p.is_ota_slot]
    small = min(slots, key=lambda p: p.size)
    if img.length > small.size:
        raise FlashError(
            f"{name}: the app is {img.length} bytes ({human(img.length)}); slot {small.label} "
            f"holds {small.size} ({human(small.size)})",
            hint="use a firmware built for an OTA partition table"
                 + (f" ({info['micropython_board']}" + (f", variant {info['micropython_variant']})"
                                                         if info.get("micropython_variant") else ")")
                    if info.get("micropython_board") else "")
                 + f", or a board definition with larger slots than boards/{board}/partitions.csv")
    if bootloader is not None:
        bl = read_input(bootloader, "bootloader", error=FlashError)
        bl = bl[:image_length(bl)]
        bl_source = f"from {Path(bootloader).name}"
    else:
        bl_source = f"from {name}"
    if bl is not None:
        bl_chip = _chip_of(bl)
        if bl_chip != info["chip"]:
            raise FlashError(f"the bootloader is for {bl_chip or 'an unknown chip'}; board {board} "
                             f"is an {info['chip']}", hint=chip_hint)
        esptool_check(bl, info["chip"], f"the bootloader ({bl_source})")
        room = int(info["partition_table_offset"], 0) - int(info["bootloader_offset"], 0)
        if len(bl) > room:
            raise FlashError(f"the bootloader is {len(bl)} bytes; only {room} fit before the partition table")
    else:
        notes.append("no bootloader in the firmware: the board keeps the one it has (any ESP-IDF "
                     "bootloader of a MicroPython v1.21+ build does OTA and rollback); give "
                     "--bootloader build-*/bootloader/bootloader.bin to replace it")
    if embedded is not None:
        if [(p.type, p.subtype, p.offset, p.size) for p in embedded] == \
                [(p.type, p.subtype, p.offset, p.size) for p in table]:
            notes.append(f"the merged image's partition table is the same layout as boards/{board}/partitions.csv")
        else:
            old = ", ".join(f"{p.label} 0x{p.offset:x}+{human(p.size)}" for p in embedded if p.type == 0)
            notes.append(f"the merged image's partition table ({old}) is replaced by boards/{board}/"
                         "partitions.csv; the filesystem partition moves, so the board starts with "
                         "a fresh filesystem unless it already had this layout (--erase-all makes sure)")
    ota = _otadata(table)
    regions = []
    if bl is not None:
        regions.append(Region(int(info["bootloader_offset"], 0), BOOTLOADER_NAME, bl, f"bootloader ({bl_source})"))
    regions += [
        Region(int(info["partition_table_offset"], 0), TABLE_NAME, partitions.to_binary(table),
               f"partition table (boards/{board}/partitions.csv)"),
        Region(ota.offset, OTADATA_NAME, b"\xff" * ota.size,
               f"{ota.label} erased (no OTA record: {slots[0].label} boots)"),
        Region(slots[0].offset, APP_NAME, app,
               f"MicroPython app {img.version or '(no version in esp_app_desc_t)'}, {human(img.length)} "
               f"of {slots[0].label}'s {human(slots[0].size)}"),
    ]
    return FlashPlan(board, info, table, kind, img, regions, notes)


def _download_hint(info: dict) -> str:
    b = info.get("micropython_board")
    if not b:
        return ""
    v = info.get("micropython_variant")
    return (f"download {b}{'-' + v if v else ''}-*.bin from https://micropython.org/download/{b}/"
            + (f" (the {v} variant)" if v else ""))


def check_complete(p: FlashPlan, why: str) -> None:
    """Refuse to erase or replace the whole flash without a bootloader to write: the board
    would not boot any more (`why`: what would do it, e.g. "--erase-all")."""
    if p.region(BOOTLOADER_NAME) is None:
        raise FlashError(f"{why} with an app image and no bootloader would leave the board without one: "
                         "it would not boot any more",
                         hint="give the bootloader of the same build (--bootloader build-*/bootloader/"
                              "bootloader.bin), or use a merged image (micropython.org's firmware .bin "
                              "has its bootloader inside)")


def merged_image(p: FlashPlan) -> bytes:
    """One image of everything, to be written at 0x0 of an erased chip (a production
    programmer, `esptool write-flash 0x0 FILE`): 0xFF between the regions, as esptool's
    merge-bin makes it. Refused without a bootloader (check_complete)."""
    check_complete(p, "a merged image for an erased chip")
    end = max(r.offset + len(r.data) for r in p.regions)
    out = bytearray(b"\xff" * end)
    for r in p.regions:
        out[r.offset:r.offset + len(r.data)] = r.data
    return bytes(out)


# ---- output: files, flash_args, the esptool command -------------------------------------------
def write_files(p: FlashPlan, out_dir: Path) -> list[tuple[int, Path]]:
    """Write each region to out_dir (ESP-IDF's file names) and `flash_args`, so that
    `esptool --chip CHIP write-flash @flash_args` (run in out_dir) writes the same."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for r in p.regions:
        path = out_dir / r.name
        path.write_bytes(r.data)
        files.append((r.offset, path))
    args = "--flash-mode keep --flash-freq keep --flash-size keep\n"
    args += "".join(f"0x{off:x} {path.name}\n" for off, path in files)
    (out_dir / FLASH_ARGS_NAME).write_text(args)
    return files


def esptool_command(p: FlashPlan, files: list[tuple[int, Path]], port: str | None,
                    baud: int = DEFAULT_BAUD, erase_all: bool = False) -> list[str]:
    """The esptool command line that writes exactly what flash() writes."""
    cmd = ["esptool", "--chip", p.chip]
    if port:
        cmd += ["--port", port]
    cmd += ["--baud", str(baud), "write-flash", "--flash-mode", "keep", "--flash-freq", "keep",
            "--flash-size", "keep"]
    if erase_all:
        cmd.append("--erase-all")
    for off, path in files:
        cmd += [f"0x{off:x}", str(path)]
    return cmd


def shell_line(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


# ---- the board: esptool's Python API -----------------------------------------------------------
def _chip_name(esp) -> str:
    return esp.CHIP_NAME.lower().replace("-", "")


def flash(p: FlashPlan, port: str, baud: int = DEFAULT_BAUD, erase_all: bool = False,
          no_progress: bool = False, log=print) -> None:
    """Connect with esptool, check the chip and the flash size, write every region (esptool
    verifies each one by MD5 after writing), then hard-reset the board into the new firmware."""
    if erase_all:
        check_complete(p, "--erase-all")
    from esptool import cmds
    from esptool.util import FatalError
    try:
        esp = cmds.connect_esp(port=port, chip="auto", initial_baud=ROM_BAUD)
    except (FatalError, OSError) as e:
        raise FlashError(f"esptool could not connect to {port}: {' '.join(str(e).split())}",
                         hint="check the cable and the port (ls /dev/tty*); hold BOOT while pressing "
                              "RESET for download mode; close serial monitors (mpremote, screen) on it; "
                              "on Linux add yourself to the dialout group") from None
    try:
        chip = _chip_name(esp)
        if chip != p.chip:
            known = [q.parent.name for q in info_paths() if _json(q).get("chip") == chip
                     and not _json(q).get("emulates")]
            raise FlashError(f"the board on {port} is an {esp.CHIP_NAME}; board {p.board} is an {p.chip}",
                             hint=f"use --board {known[0]}" if known else "no board definition in boards/ "
                                                                          f"is for {esp.CHIP_NAME}")
        log(f"flash: connected to {esp.CHIP_NAME} on {port}")
        esp = cmds.run_stub(esp)
        if baud > ROM_BAUD:
            esp.change_baud(baud)
        cmds.attach_flash(esp)
        detected = cmds.detect_flash_size(esp)
        end = max(q.offset + q.size for q in p.table)
        if detected and flash_size_bytes(detected) < end:
            raise FlashError(f"the board's flash is {detected}; boards/{p.board}/partitions.csv needs "
                             f"{human(end)}", hint="use a board definition for this flash size")
        log(f"flash: flash size {detected or 'unknown'}; writing {len(p.regions)} regions")
        cmds.write_flash(esp, [(r.offset, r.data) for r in p.regions], flash_mode="keep",
                         flash_freq="keep", flash_size="keep", erase_all=erase_all,
                         no_progress=no_progress)
        cmds.reset_chip(esp, "hard-reset")
    except FatalError as e:
        raise FlashError(f"esptool: {e}") from None
    finally:
        try:
            esp._port.close()
        except Exception:  # noqa: BLE001 - closing a port that already failed
            pass
