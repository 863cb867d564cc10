"""`mpota flash` and the board definitions, without a board.

What is checked by independent readers, not by our own code:
  * the partition table binary: a reader written here from ESP-IDF's format
    (components/partition_table/gen_esp32part.py: 32-byte entries, MD5 entry, 0xFF padding)
    plus gen_esp32part's layout rules, compared with the CSV read here with the csv module;
  * the images and the layout: esptool's own CLI (`merge-bin`, `image-info`, and the printed
    `write-flash` command, which esptool parses and only fails at opening the port);
  * the result: the merged flash image, booted by the simulated ESP-IDF bootloader, runs the
    flashed firmware from ota_0, and the agent then updates it to 2.0.0.
The serial path (esptool's Python API) is exercised against a stand-in for esptool's connect
and write functions: no board is attached to this machine.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mpota import espimage, flashing

ROOT = Path(__file__).resolve().parents[1]
BOARDS = ROOT / "boards"
BIN = Path(sys.executable).parent
MPOTA = str(BIN / "mpota")
ESPTOOL = str(BIN / "esptool")
REAL_BOARDS = ["esp32", "esp32s3", "esp32c3"]

# gen_esp32part.py's names, written out here so the test does not borrow ours.
IDF_TYPES = {"app": 0x00, "data": 0x01}
IDF_SUBTYPES = {"app": {"factory": 0x00, "ota_0": 0x10, "ota_1": 0x11, "test": 0x20},
                "data": {"ota": 0x00, "phy": 0x01, "nvs": 0x02, "coredump": 0x03, "fat": 0x81,
                         "spiffs": 0x82, "littlefs": 0x83}}
# MicroPython's OTA tables: ports/esp32/partitions-4MiB-ota.csv and partitions-8MiBplus-ota.csv.
MICROPYTHON_SLOTS = {"esp32": (0x10000, 0x190000, 0x180000), "esp32c3": (0x10000, 0x190000, 0x180000),
                     "esp32s3": (0x10000, 0x280000, 0x270000)}


def mpota(*args, cwd=None):
    return subprocess.run([MPOTA, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def board_json(name):
    return json.loads((BOARDS / name / "board.json").read_text())


def idf_read_table(blob: bytes) -> list[dict]:
    """ESP-IDF's binary partition table, read from the format description alone."""
    assert len(blob) == 0xC00, "the table occupies 0xC00 bytes (3 KiB) at 0x8000"
    entries, md5 = [], hashlib.md5()
    for i in range(0, len(blob), 32):
        e = blob[i:i + 32]
        if e == b"\xff" * 32:
            break
        magic = e[:2]
        if magic == b"\xeb\xeb":
            assert e[2:16] == b"\xff" * 14
            assert e[16:] == md5.digest(), "MD5 entry does not cover the entries"
            assert blob[i + 32:] == b"\xff" * (len(blob) - i - 32), "padding after the MD5 entry"
            return entries
        assert magic == b"\xaa\x50", f"entry {i // 32}: bad magic {magic.hex()}"
        ptype, subtype, offset, size = struct.unpack("<BBII", e[2:12])
        name = e[12:28].rstrip(b"\x00").decode("ascii")
        (flags,) = struct.unpack("<I", e[28:32])
        entries.append({"name": name, "type": ptype, "subtype": subtype, "offset": offset,
                        "size": size, "flags": flags})
        md5.update(e)
    raise AssertionError("no MD5 entry")


def csv_rows(path: Path) -> list[dict]:
    rows = []
    for row in csv.reader(path.read_text().splitlines()):
        row = [c.strip() for c in row]
        if not row or not row[0] or row[0].startswith("#"):
            continue
        name, ptype, sub, off, size = row[:5]
        rows.append({"name": name, "type": IDF_TYPES[ptype], "subtype": IDF_SUBTYPES[ptype][sub],
                     "offset": int(off, 16), "size": int(size, 16), "flags": 0})
    return rows


def sim_bootloader(chip: str) -> bytes:
    """A bootloader-shaped ESP image (esp_bootloader_desc_t in its DRAM segment) that esptool
    reads as a bootloader; stands in for bootloader.bin of a MicroPython build."""
    from esptool.targets import CHIP_DEFS
    rom = CHIP_DEFS[chip]
    dram = next(s for s, _e, n in rom.MEMORY_MAP if n == "DRAM")
    iram = next(s for s, _e, n in rom.MEMORY_MAP if n == "IRAM")
    desc = struct.pack("<B3sI32s24s16s", 0x50, b"", 1, b"v5.4-sim", b"Nov 26 2026 00:00:00", b"")
    return espimage.build([(dram + 0x100, desc + bytes(64)), (iram + 0x100, bytes(2048))], chip, iram + 0x100)


def stock_merged(chip: str, app: bytes, start: int, table_csv: str) -> bytes:
    """A merged firmware as MicroPython's makeimg.py writes it (ESP32_GENERIC-…bin): bootloader
    at the bootloader offset, partition table at 0x8000, app at 0x10000, 0xFF between, the file
    starting at `start`. The table is built here, independently."""
    entries = b""
    for r in csv_rows_text(table_csv):
        entries += b"\xaa\x50" + struct.pack("<BBII16sI", r["type"], r["subtype"], r["offset"], r["size"],
                                             r["name"].encode(), 0)
    table = entries + b"\xeb\xeb" + b"\xff" * 14 + hashlib.md5(entries).digest()
    table += b"\xff" * (0xC00 - len(table))
    bl_off = int(board_json(chip)["bootloader_offset"], 16)
    image = bytearray(b"\xff" * (0x10000 - start)) + app
    bl = sim_bootloader(chip)
    image[bl_off - start:bl_off - start + len(bl)] = bl
    image[0x8000 - start:0x8000 - start + len(table)] = table
    return bytes(image)


def csv_rows_text(text: str) -> list[dict]:
    rows = []
    for row in csv.reader(text.strip().splitlines()):
        name, ptype, sub, off, size = [c.strip() for c in row[:5]]
        rows.append({"name": name, "type": IDF_TYPES[ptype], "subtype": IDF_SUBTYPES[ptype][sub],
                     "offset": int(off, 16), "size": int(size, 16)})
    return rows


# MicroPython's default (non-OTA) 4 MiB table: one factory app, the rest for the filesystem.
STOCK_4MIB = """
nvs,      data, nvs,     0x9000,  0x6000,
phy_init, data, phy,     0xf000,  0x1000,
factory,  app,  factory, 0x10000, 0x1F0000,
"""


def dry_run(board, firmware, out, *extra):
    r = mpota("flash", firmware, "--board", board, "--dry-run", "--out", out, *extra)
    assert r.returncode == 0, r.stderr
    cmd = next(line for line in r.stdout.splitlines() if line.startswith("esptool "))
    return r.stdout, shlex.split(cmd)


def addr_files(cmd: list[str]) -> list[tuple[int, str]]:
    i = cmd.index("write-flash")
    rest = [c for c in cmd[i + 1:] if not c.startswith("--") and c not in ("keep",)]
    return [(int(rest[k], 16), rest[k + 1]) for k in range(0, len(rest), 2)]


# ---- board definitions -------------------------------------------------------------------------
@pytest.mark.parametrize("board", REAL_BOARDS)
def test_board_tables_are_micropythons_ota_layouts(board):
    info = board_json(board)
    assert info["name"] == board and info["chip"] == board
    assert info["chip_id"] == espimage.CHIPS[board][0]
    assert info["bootloader_offset"] == {"esp32": "0x1000"}.get(board, "0x0")
    assert info["mpy_arch"] == {"esp32c3": "rv32imc"}.get(board, "xtensawin")
    assert re.fullmatch(r"\d+K", info["heap"])
    rows = {r["name"]: r for r in csv_rows(BOARDS / board / "partitions.csv")}
    assert set(rows) == {"nvs", "otadata", "phy_init", "ota_0", "ota_1", "vfs"}
    assert rows["otadata"]["size"] == 0x2000 and rows["otadata"]["subtype"] == 0x00
    o0, o1, size = MICROPYTHON_SLOTS[board]
    assert (rows["ota_0"]["offset"], rows["ota_1"]["offset"], rows["ota_0"]["size"], rows["ota_1"]["size"]) == \
        (o0, o1, size, size)
    flash = int(info["flash_size"].removesuffix("MB")) << 20
    assert rows["vfs"]["offset"] + rows["vfs"]["size"] == flash, "the filesystem takes the rest of the flash"


def test_unix_board_keeps_the_keys_the_simulator_reads():
    info = board_json("unix")
    assert {"name", "board_id", "chip", "chip_id", "mpy_arch", "heap"} <= set(info)
    assert info["mpy_arch"] == "x64" and info["chip"] == "esp32"


def test_mpota_boards_lists_every_board():
    r = mpota("boards")
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert names == ["esp32", "esp32c3", "esp32s3", "unix"]
    assert "2 x 2.44 MiB OTA slots" in r.stdout and "rv32imc" in r.stdout


# ---- what flash writes ---------------------------------------------------------------------------
@pytest.mark.parametrize("board", REAL_BOARDS)
def test_partition_table_reads_back_with_an_independent_reader(board, firmware, tmp_path):
    out, _cmd = dry_run(board, firmware("1.0.0", chip=board), tmp_path / "out")
    entries = idf_read_table((tmp_path / "out" / "partition-table.bin").read_bytes())
    assert entries == csv_rows(BOARDS / board / "partitions.csv")
    # gen_esp32part's rules: apps 64 KiB aligned, data 4 KiB aligned, nothing overlaps, nothing
    # before the end of the table's sector, unique names.
    end = 0x8000 + 0x1000
    for e in sorted(entries, key=lambda e: e["offset"]):
        assert e["offset"] % (0x10000 if e["type"] == 0 else 0x1000) == 0, e
        assert e["offset"] >= end, f"{e['name']} overlaps what comes before it"
        end = e["offset"] + e["size"]
    assert len({e["name"] for e in entries}) == len(entries)
    assert (tmp_path / "out" / "ota_data_initial.bin").read_bytes() == b"\xff" * 0x2000


@pytest.mark.parametrize("board", REAL_BOARDS)
def test_esptool_merge_bin_and_image_info_accept_the_outputs(board, firmware, tmp_path):
    fw = tmp_path / "stock.bin"
    app = firmware("1.0.0", chip=board).read_bytes()
    start = int(board_json(board)["bootloader_offset"], 16)
    fw.write_bytes(stock_merged(board, app, start, STOCK_4MIB))
    stdout, cmd = dry_run(board, fw, tmp_path / "out")
    assert "merged image" in stdout and "is replaced by boards/" in stdout
    pairs = addr_files(cmd)
    info = board_json(board)
    assert [a for a, _ in pairs] == [start, 0x8000, 0xD000, 0x10000]
    out = tmp_path / "out"
    assert (out / "micropython.bin").read_bytes() == app
    assert (out / "bootloader.bin").read_bytes() == sim_bootloader(board)

    r = subprocess.run([ESPTOOL, "--chip", board, "image-info", str(out / "micropython.bin")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "App version: 1.0.0" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("(valid)") == 2
    r = subprocess.run([ESPTOOL, "--chip", board, "image-info", str(out / "bootloader.bin")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Bootloader version: 1" in r.stdout, r.stdout + r.stderr

    merged = tmp_path / "merged.bin"
    r = subprocess.run([ESPTOOL, "--chip", board, "merge-bin", "-o", str(merged), "--pad-to-size",
                        info["flash_size"], *[x for a, f in pairs for x in (hex(a), f)]],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    flash = merged.read_bytes()
    assert len(flash) == int(info["flash_size"].removesuffix("MB")) << 20
    for addr, f in pairs:
        data = Path(f).read_bytes()
        assert flash[addr:addr + len(data)] == data, f"{f} at 0x{addr:x}"
    # ... and the same with ESP-IDF's flash_args file, as `esptool write-flash @flash_args` reads it.
    args = (out / "flash_args").read_text().split()
    r = subprocess.run([ESPTOOL, "--chip", board, "merge-bin", "-o", str(tmp_path / "m2.bin"), "--pad-to-size",
                        info["flash_size"], *args], capture_output=True, text=True, cwd=out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "m2.bin").read_bytes() == flash


def test_printed_esptool_command_is_one_esptool_accepts(firmware, tmp_path):
    # The dry run's command, run as printed but against a port where nothing listens: esptool
    # parses every argument and then fails at opening the port (not with a usage error).
    _out, cmd = dry_run("esp32", firmware("1.0.0"), tmp_path / "out", "--port", "socket://127.0.0.1:1")
    assert cmd[:5] == ["esptool", "--chip", "esp32", "--port", "socket://127.0.0.1:1"]
    r = subprocess.run([ESPTOOL, *cmd[1:]], capture_output=True, text=True)
    text = r.stdout + r.stderr
    assert "Could not open socket://127.0.0.1:1" in text and "Usage:" not in text


def test_flashed_layout_boots_in_the_simulator_and_updates(firmware, keydir, signer, server, make_device, tmp_path):
    # A stock-style merged 1.0.0, through `mpota flash`, merged by esptool into a 4 MiB flash
    # image; that image becomes a simulated device's flash: the ESP-IDF bootloader rules boot
    # ota_0 (otadata erased), and the agent updates to 2.0.0 into ota_1.
    fw = tmp_path / "stock.bin"
    fw.write_bytes(stock_merged("esp32", firmware("1.0.0").read_bytes(), 0x1000, STOCK_4MIB))
    _out, cmd = dry_run("esp32", fw, tmp_path / "out")
    merged = tmp_path / "flash.bin"
    r = subprocess.run([ESPTOOL, "--chip", "esp32", "merge-bin", "-o", str(merged), "--pad-to-size", "4MB",
                        *[x for a, f in addr_files(cmd) for x in (hex(a), f)]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dev = make_device(firmware("0.0.1"), server.url)
    dev.dev.flash.write_bytes(merged.read_bytes())
    server.publish(firmware("2.0.0"), signer)
    boots = dev.run()
    # 1.0.0 installs 2.0.0 and resets; 2.0.0 confirms itself and resets (its trial watchdog
    # cannot be stopped); 2.0.0 runs its application
    assert [(b.slot, b.version) for b in boots] == [("ota_0", "1.0.0"), ("ota_1", "2.0.0"), ("ota_1", "2.0.0")], \
        dev.output
    st = dev.status()
    assert st["version"] == "2.0.0" and st["slots"]["ota_1"] == "VALID"


# ---- refusals ---------------------------------------------------------------------------------
def test_firmware_too_large_for_the_slot_is_refused(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(espimage.build_sim_firmware("1.0.0", size=0x180000 + 4096))
    r = mpota("flash", big, "--board", "esp32", "--dry-run", "--out", tmp_path / "out")
    assert r.returncode == 2
    assert "slot ota_0 holds 1572864 (1.50 MiB)" in r.stderr and "OTA" in r.stderr and "hint:" in r.stderr
    assert not (tmp_path / "out").exists(), "nothing is written for a refused firmware"
    # The same image fits the S3's 2.44 MiB slots.
    ok = tmp_path / "big-s3.bin"
    ok.write_bytes(espimage.build_sim_firmware("1.0.0", size=0x180000 + 4096, chip="esp32s3"))
    assert mpota("flash", ok, "--board", "esp32s3", "--dry-run", "--out", tmp_path / "s3").returncode == 0


def test_firmware_for_another_chip_is_refused(firmware, tmp_path):
    r = mpota("flash", firmware("1.0.0", chip="esp32c3"), "--board", "esp32", "--dry-run", "--out", tmp_path / "o")
    assert r.returncode == 2
    assert "firmware for esp32c3; board esp32 is an esp32" in r.stderr and "--board esp32c3" in r.stderr
    fw = tmp_path / "s3-merged.bin"
    fw.write_bytes(stock_merged("esp32s3", firmware("1.0.0", chip="esp32s3").read_bytes(), 0, STOCK_4MIB))
    r = mpota("flash", fw, "--board", "esp32c3", "--dry-run", "--out", tmp_path / "o")
    assert r.returncode == 2 and "esp32s3" in r.stderr
    # a bootloader for another chip, given with an app image for the right one
    bl = tmp_path / "bl.bin"
    bl.write_bytes(sim_bootloader("esp32s3"))
    r = mpota("flash", firmware("1.0.0"), "--board", "esp32", "--bootloader", bl, "--dry-run", "--out", tmp_path / "o")
    assert r.returncode == 2 and "bootloader is for esp32s3" in r.stderr


def test_broken_or_foreign_files_are_refused_with_a_hint(firmware, tmp_path):
    elf = tmp_path / "firmware.elf"
    elf.write_bytes(b"\x7fELF" + bytes(4000))
    r = mpota("flash", elf, "--dry-run", "--out", tmp_path / "o")
    assert r.returncode == 2 and "not an ESP firmware image" in r.stderr and ".elf" in r.stderr
    bad = tmp_path / "bad.bin"
    data = bytearray(firmware("1.0.0").read_bytes())
    data[5000] ^= 0xFF
    bad.write_bytes(data)
    r = mpota("flash", bad, "--dry-run", "--out", tmp_path / "o")
    assert r.returncode == 2 and "checksum" in r.stderr
    r = mpota("flash", firmware("1.0.0"), "--board", "unix", "--dry-run")
    assert r.returncode == 2 and "simulator" in r.stderr
    # no --port and no --dry-run: the port is looked for (tests/test_serialports.py, against a stand-in
    # port list: run here, it would flash whatever board this machine has attached)
    r = mpota("flash", tmp_path / "missing.bin", "--dry-run")
    assert r.returncode == 2 and "micropython.org/download/ESP32_GENERIC" in r.stderr


# ---- the serial path, against a stand-in for esptool's connect/write functions -----------------
class FakeESP:
    def __init__(self, chip_name="ESP32", flash_size="4MB"):
        self.CHIP_NAME = chip_name
        self.flash_size = flash_size
        self.flash = bytearray(b"\xaa" * (4 << 20))  # not erased: otadata must come out 0xFF
        self.calls = []
        self._port = type("Port", (), {"close": lambda _self: self.calls.append("close")})()

    def change_baud(self, baud):
        self.calls.append(("baud", baud))


@pytest.fixture
def fake_esptool(monkeypatch):
    from esptool import cmds
    state = {}

    def connect_esp(port=None, chip="auto", initial_baud=115200, **kw):
        state["port"], state["initial_baud"] = port, initial_baud
        return state["esp"]

    def write_flash(esp, addr_data, **kw):
        esp.calls.append(("write", [a for a, _ in addr_data], kw.get("flash_size"), kw.get("erase_all")))
        for addr, data in addr_data:
            esp.flash[addr:addr + len(data)] = data

    monkeypatch.setattr(cmds, "connect_esp", connect_esp)
    monkeypatch.setattr(cmds, "run_stub", lambda esp, plugins=None: esp.calls.append("stub") or esp)
    monkeypatch.setattr(cmds, "attach_flash", lambda esp, *a, **k: esp.calls.append("attach"))
    monkeypatch.setattr(cmds, "detect_flash_size", lambda esp: esp.flash_size)
    monkeypatch.setattr(cmds, "write_flash", write_flash)
    monkeypatch.setattr(cmds, "reset_chip", lambda esp, mode="hard-reset": esp.calls.append(("reset", mode)))
    return state


def test_flash_writes_every_region_through_esptools_api(firmware, fake_esptool, tmp_path):
    fw = tmp_path / "stock.bin"
    app = firmware("1.0.0").read_bytes()
    fw.write_bytes(stock_merged("esp32", app, 0x1000, STOCK_4MIB))
    fake_esptool["esp"] = esp = FakeESP()
    plan = flashing.plan("esp32", fw)
    flashing.flash(plan, "/dev/ttyUSB0", 921600, log=lambda m: None)
    assert fake_esptool["port"] == "/dev/ttyUSB0" and fake_esptool["initial_baud"] == 115200
    assert esp.calls == ["stub", ("baud", 921600), "attach", ("write", [0x1000, 0x8000, 0xD000, 0x10000], "keep", False),
                         ("reset", "hard-reset"), "close"]
    assert esp.flash[0x1000:0x1000 + len(sim_bootloader("esp32"))] == sim_bootloader("esp32")
    assert idf_read_table(bytes(esp.flash[0x8000:0x8C00])) == csv_rows(BOARDS / "esp32" / "partitions.csv")
    assert esp.flash[0xD000:0xF000] == b"\xff" * 0x2000
    assert esp.flash[0x10000:0x10000 + len(app)] == app


@pytest.mark.parametrize("chip_name,flash_size,message", [
    ("ESP32-S3", "8MB", "is an ESP32-S3; board esp32 is an esp32"),
    ("ESP32", "2MB", "flash is 2MB"),
])
def test_flash_refuses_the_wrong_board_before_writing(chip_name, flash_size, message, firmware, fake_esptool):
    fake_esptool["esp"] = esp = FakeESP(chip_name, flash_size)
    with pytest.raises(flashing.FlashError) as e:
        flashing.flash(flashing.plan("esp32", firmware("1.0.0")), "/dev/ttyUSB0", log=lambda m: None)
    assert message in str(e.value)
    assert not any(isinstance(c, tuple) and c[0] == "write" for c in esp.calls)
    assert esp.calls[-1] == "close"
    if chip_name == "ESP32-S3":
        assert e.value.hint == "use --board esp32s3"


def test_unreachable_port_is_a_clear_error(firmware, tmp_path):
    r = mpota("flash", firmware("1.0.0"), "--port", "socket://127.0.0.1:1", "--out", tmp_path / "o")
    assert r.returncode == 2
    assert "could not connect to socket://127.0.0.1:1" in r.stderr and "hint:" in r.stderr


def test_micropythons_ota_merged_image_keeps_its_layout(firmware, tmp_path):
    # ESP32_GENERIC-OTA-….bin: the merged image already has the 4 MiB OTA table.
    fw = tmp_path / "ESP32_GENERIC-OTA.bin"
    ota_csv = "\n".join(line for line in (BOARDS / "esp32" / "partitions.csv").read_text().splitlines()
                        if line and not line.startswith("#"))
    fw.write_bytes(stock_merged("esp32", firmware("1.0.0").read_bytes(), 0x1000, ota_csv))
    stdout, cmd = dry_run("esp32", fw, tmp_path / "out")
    assert "merged image" in stdout and "same layout as boards/esp32/partitions.csv" in stdout
    assert [a for a, _ in addr_files(cmd)] == [0x1000, 0x8000, 0xD000, 0x10000]
    # a full flash dump from 0x0 (esptool read-flash 0 ALL) is read the same way
    dump = tmp_path / "dump.bin"
    dump.write_bytes(b"\xff" * 0x1000 + fw.read_bytes())
    _out, cmd2 = dry_run("esp32", dump, tmp_path / "out2")
    assert [Path(f).read_bytes() for _, f in addr_files(cmd2)] == [Path(f).read_bytes() for _, f in addr_files(cmd)]


def test_app_image_with_a_separate_bootloader(firmware, tmp_path):
    bl = tmp_path / "bootloader.bin"
    bl.write_bytes(sim_bootloader("esp32c3") + b"\xff" * 100)  # trailing padding is cut off
    stdout, cmd = dry_run("esp32c3", firmware("1.0.0", chip="esp32c3"), tmp_path / "out", "--bootloader", bl)
    assert [a for a, _ in addr_files(cmd)] == [0x0, 0x8000, 0xD000, 0x10000]
    assert (tmp_path / "out" / "bootloader.bin").read_bytes() == sim_bootloader("esp32c3")
    assert "app image" in stdout and "bootloader (from bootloader.bin)" in stdout


def test_the_esptool_functions_flash_calls_take_these_arguments():
    # The stand-ins above replace esptool's functions; this pins the real signatures they mimic.
    import inspect

    from esptool import cmds
    esp = object()
    inspect.signature(cmds.connect_esp).bind(port="/dev/ttyUSB0", chip="auto", initial_baud=115200)
    inspect.signature(cmds.run_stub).bind(esp)
    inspect.signature(cmds.attach_flash).bind(esp)
    inspect.signature(cmds.detect_flash_size).bind(esp)
    inspect.signature(cmds.reset_chip).bind(esp, "hard-reset")
    inspect.signature(cmds.write_flash).bind(esp, [(0x8000, b"")], flash_mode="keep", flash_freq="keep",
                                             flash_size="keep", erase_all=False, no_progress=False)
    src = inspect.getsource(cmds.write_flash)
    assert 'kwargs.get("erase_all"' in src and 'kwargs.get("no_progress"' in src
    assert hasattr(cmds.ESPLoader, "change_baud")


def test_a_bootloader_given_as_firmware_is_refused_with_a_hint(tmp_path):
    bl = tmp_path / "bootloader.bin"
    bl.write_bytes(sim_bootloader("esp32"))
    r = mpota("flash", bl, "--dry-run", "--out", tmp_path / "o")
    assert r.returncode == 2 and "not an application" in r.stderr and "--bootloader" in r.stderr


def test_an_app_image_is_never_mistaken_for_a_merged_one(tmp_path):
    # An app whose bytes at 0x7000 happen to look like a partition table entry is still an app.
    app = bytearray(espimage.build_sim_firmware("1.0.0", size=64 * 1024))
    app[0x7000:0x7002] = b"\xaa\x50"
    kind, bl, out, table = flashing.split_firmware(bytes(app), board_json("esp32"))
    assert (kind, bl, table) == ("app", None, None) and out == bytes(app)


def test_a_merged_image_with_a_damaged_partition_table_is_refused(firmware, tmp_path):
    # a label that is not text, or an entry cut off by the end of the file: an error, not a crash
    ota_csv = "\n".join(line for line in (BOARDS / "esp32" / "partitions.csv").read_text().splitlines()
                        if line and not line.startswith("#"))
    good = stock_merged("esp32", firmware("1.0.0").read_bytes(), 0x1000, ota_csv)
    label = bytearray(good)
    label[0x8000 - 0x1000 + 12] = 0xFF  # first entry's label: not UTF-8
    (tmp_path / "label.bin").write_bytes(label)
    r = mpota("flash", tmp_path / "label.bin", "--dry-run", "--out", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "partition table" in r.stderr, r.stderr
    short = good[:0x8000 - 0x1000 + 40]  # the file ends inside the second entry
    (tmp_path / "short.bin").write_bytes(short)
    r = mpota("flash", tmp_path / "short.bin", "--dry-run", "--out", tmp_path / "o2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


# ---- never leave a board without a bootloader ------------------------------------------------
def test_erase_all_or_a_merged_image_without_a_bootloader_is_refused(firmware, tmp_path):
    # --erase-all erases the bootloader too: with an app image and no --bootloader, nothing
    # would be written back there and the board would not boot any more.
    for extra in (["--erase-all", "--dry-run"], ["--erase-all", "--port", "/dev/ttyUSB9"],
                  ["--merged", tmp_path / "flash.bin"]):
        r = mpota("flash", firmware("1.0.0"), "--board", "esp32", "--out", tmp_path / "o", *extra)
        assert r.returncode == 2, (extra, r.stdout, r.stderr)
        assert "no bootloader" in r.stderr and "would not boot" in r.stderr, r.stderr
        assert "--bootloader" in r.stderr and "merged image" in r.stderr  # the hint: how to do it
        assert "esptool " not in r.stdout and not (tmp_path / "flash.bin").exists()
    # the library refuses too, before it connects to anything
    with pytest.raises(flashing.FlashError, match="no bootloader"):
        flashing.flash(flashing.plan("esp32", firmware("1.0.0")), "/dev/ttyUSB9", erase_all=True)


def test_erase_all_and_merged_with_a_bootloader(firmware, tmp_path):
    bl = tmp_path / "bootloader.bin"
    bl.write_bytes(sim_bootloader("esp32"))
    _out, cmd = dry_run("esp32", firmware("1.0.0"), tmp_path / "out", "--bootloader", bl, "--erase-all")
    assert "--erase-all" in cmd and addr_files(cmd)[0][0] == 0x1000
    merged = tmp_path / "flash.bin"
    r = mpota("flash", firmware("1.0.0"), "--board", "esp32", "--bootloader", bl, "--out", tmp_path / "out2",
              "--merged", merged)
    assert r.returncode == 0, r.stderr
    assert "write-flash 0x0" in r.stdout
    # the same as esptool's merge-bin of the files at their offsets, from 0x0
    want = tmp_path / "want.bin"
    files = [str(x) for off, name in addr_files(cmd) for x in (hex(off), tmp_path / "out2" / Path(name).name)]
    subprocess.run([ESPTOOL, "--chip", "esp32", "merge-bin", "-o", want, *files], check=True, capture_output=True)
    assert merged.read_bytes() == want.read_bytes()
