"""ESP app image format (esp_image_header_t, segments, checksum, appended SHA-256, esp_app_desc_t).

Reads the facts a release needs from an image (chip, version, secure version), checks an image
the way ESP-IDF's esp_image_verify() does, and builds the simulated firmware images the unix
board runs. esptool is the independent reader in the tests (`esptool image-info`).
"""
from __future__ import annotations

import hashlib
import random
import struct
from dataclasses import dataclass

from . import MpotaError

IMAGE_MAGIC = 0xE9
APP_DESC_MAGIC = 0xABCD5432
HEADER_LEN = 24            # esp_image_header_t
SEGMENT_HEADER_LEN = 8     # esp_image_segment_header_t
APP_DESC_LEN = 256         # esp_app_desc_t
SIM_MARKER = b"MPOTA-SIM behavior="
# how a simulated image behaves when booted (boards/unix/firmware.py)
BEHAVIORS = ("healthy", "unhealthy", "crash", "raise", "hang", "stuck")

# chip name -> (esp_chip_id_t, DROM address the first segment is mapped at)
CHIPS = {
    "esp32": (0, 0x3F400020),
    "esp32s2": (2, 0x3F000020),
    "esp32c3": (5, 0x3C000020),
    "esp32s3": (9, 0x3C000020),
    "esp32c2": (12, 0x3C000020),
    "esp32c6": (13, 0x42800020),
    "esp32h2": (16, 0x42800020),
}
CHIP_BY_ID = {cid: name for name, (cid, _) in CHIPS.items()}
# An IRAM load address per chip for the small code segment of simulated images.
_IRAM = {"esp32": 0x40080000, "esp32s2": 0x40020000, "esp32c3": 0x40380000,
         "esp32s3": 0x40370000, "esp32c2": 0x40380000, "esp32c6": 0x40800000,
         "esp32h2": 0x40800000}


class ImageError(MpotaError):
    """The bytes are not a valid ESP app image."""


@dataclass
class ImageInfo:
    chip: str | None
    chip_id: int
    version: str
    secure_version: int
    project_name: str
    length: int            # bytes the image occupies, checksum and digest included
    behavior: str | None   # simulated firmware only


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


ESP8266_V2_MAGIC = 0xEA  # the ESP8266's "version 2" image (irom0 mapped); V1 images start 0xE9 too


def is_esp8266(data: bytes) -> bool:
    """An ESP8266 image? Its header is 8 bytes, with no extended header after it: esptool tells
    the two apart the same way (image-info: the byte where ESP32-class images keep their
    hash-appended flag, 23, is 0 or 1 and the chip id at 12 is a known one, else it is ESP8266)."""
    if len(data) < HEADER_LEN or data[0] not in (IMAGE_MAGIC, ESP8266_V2_MAGIC):
        return False
    if data[0] == ESP8266_V2_MAGIC:
        return True
    try:
        from esptool.targets import ROM_LIST
        known = {r.IMAGE_CHIP_ID for r in ROM_LIST if r.IMAGE_CHIP_ID is not None}
    except ImportError:
        known = set(CHIP_BY_ID)
    return data[23] not in (0, 1) or struct.unpack_from("<H", data, 12)[0] not in known


ESP8266_REFUSAL = ("this is an ESP8266 image (8-byte header, no extended header, no esp_app_desc_t): "
                   "mpota updates ESP32-family chips (esp32, esp32s3, esp32c3, ...)")
ESP8266_HINT = "use a MicroPython firmware for an ESP32 board (`mpota boards` lists them)"


def parse(data: bytes) -> ImageInfo:
    """Check an image as esp_image_verify() does and return what it says about itself."""
    if is_esp8266(data):
        raise ImageError(ESP8266_REFUSAL, hint=ESP8266_HINT)
    if len(data) < HEADER_LEN + SEGMENT_HEADER_LEN + APP_DESC_LEN:
        raise ImageError(f"image is {len(data)} bytes: too short for an ESP app image")
    magic, nseg = data[0], data[1]
    if magic != IMAGE_MAGIC:
        raise ImageError(f"bad image magic 0x{magic:02x} (expected 0xe9)",
                         hint="is this an application .bin (not an .elf or a merged flash image)?")
    chip_id = struct.unpack_from("<H", data, 12)[0]
    hash_appended = data[23] == 1
    if not 1 <= nseg <= 16:
        raise ImageError(f"image has {nseg} segments (1..16 allowed)")
    pos, csum = HEADER_LEN, 0xEF
    for i in range(nseg):
        if pos + SEGMENT_HEADER_LEN > len(data):
            raise ImageError(f"segment {i} header runs past the end of the image")
        _addr, n = struct.unpack_from("<II", data, pos)
        pos += SEGMENT_HEADER_LEN
        if n % 4 or pos + n > len(data):
            raise ImageError(f"segment {i} length {n} is not aligned or runs past the end")
        for b in data[pos:pos + n]:
            csum ^= b
        pos += n
    pos += 15 - pos % 16
    if pos >= len(data) or data[pos] != csum:
        raise ImageError("image checksum mismatch")
    pos += 1
    if hash_appended:
        if data[pos:pos + 32] != hashlib.sha256(data[:pos]).digest():
            raise ImageError("appended SHA-256 of the image does not match")
        pos += 32
    desc = data[HEADER_LEN + SEGMENT_HEADER_LEN:HEADER_LEN + SEGMENT_HEADER_LEN + APP_DESC_LEN]
    dmagic, secure_version = struct.unpack_from("<II", desc)
    if dmagic != APP_DESC_MAGIC:
        raise ImageError("no esp_app_desc_t at the start of the first segment")
    behavior = None
    tail = data[HEADER_LEN + SEGMENT_HEADER_LEN + APP_DESC_LEN:][:64]
    if tail.startswith(SIM_MARKER):
        behavior = _cstr(tail[len(SIM_MARKER):])
    return ImageInfo(chip=CHIP_BY_ID.get(chip_id), chip_id=chip_id, version=_cstr(desc[16:48]),
                     secure_version=secure_version, project_name=_cstr(desc[48:80]),
                     length=pos, behavior=behavior)


def _rev(full: int) -> str:
    return "none" if full == 0xFFFF else f"v{full // 100}.{full % 100}"


def describe(data: bytes) -> dict:
    """Everything an ESP app image says about itself, read leniently (as `esptool image-info`
    does): header, extended header, segments, checksum and appended SHA-256 (each with whether
    it is valid) and esp_app_desc_t. "problems" lists what parse() would refuse; "valid" is
    True when there is nothing. ImageError for what is not an ESP32-family app image at all."""
    if is_esp8266(data):
        raise ImageError(ESP8266_REFUSAL, hint=ESP8266_HINT)
    if len(data) < HEADER_LEN or data[0] != IMAGE_MAGIC:
        raise ImageError(f"not an ESP app image (first byte 0x{data[0]:02x}, expected 0xe9)" if data
                         else "the file is empty", hint="give an application .bin, a release directory or a manifest.json")
    nseg, entry = data[1], struct.unpack_from("<I", data, 4)[0]
    chip_id, min_rev, max_rev = struct.unpack_from("<H", data, 12)[0], *struct.unpack_from("<HH", data, 15)
    problems, segments = [], []
    pos, csum = HEADER_LEN, 0xEF
    for i in range(nseg):
        if pos + SEGMENT_HEADER_LEN > len(data):
            problems.append(f"segment {i} header runs past the end of the file")
            break
        addr, n = struct.unpack_from("<II", data, pos)
        segments.append({"index": i, "load_address": addr, "length": n, "file_offset": pos + SEGMENT_HEADER_LEN})
        pos += SEGMENT_HEADER_LEN
        if pos + n > len(data):
            problems.append(f"segment {i} runs past the end of the file")
            break
        for b in data[pos:pos + n]:
            csum ^= b
        pos += n
    pos += 15 - pos % 16
    stored = data[pos] if pos < len(data) else None
    checksum = {"stored": stored, "computed": csum, "valid": stored == csum}
    if stored != csum:
        problems.append("checksum mismatch")
    pos += 1
    digest = None
    if data[23] == 1:
        want = hashlib.sha256(data[:pos]).hexdigest()
        got = data[pos:pos + 32].hex()
        digest = {"stored": got, "computed": want, "valid": got == want}
        if got != want:
            problems.append("appended SHA-256 does not match")
        pos += 32
    desc = data[HEADER_LEN + SEGMENT_HEADER_LEN:HEADER_LEN + SEGMENT_HEADER_LEN + APP_DESC_LEN]
    app = None
    if len(desc) == APP_DESC_LEN and struct.unpack_from("<I", desc)[0] == APP_DESC_MAGIC:
        app = {"version": _cstr(desc[16:48]), "secure_version": struct.unpack_from("<I", desc, 4)[0],
               "project": _cstr(desc[48:80]), "time": _cstr(desc[80:96]), "date": _cstr(desc[96:112]),
               "idf_version": _cstr(desc[112:144]), "elf_sha256": desc[144:176].hex()}
        tail = data[HEADER_LEN + SEGMENT_HEADER_LEN + APP_DESC_LEN:][:64]
        if tail.startswith(SIM_MARKER):
            app["simulated_behavior"] = _cstr(tail[len(SIM_MARKER):])
    else:
        problems.append("no esp_app_desc_t at the start of the first segment (not an application image)")
    chip = CHIP_BY_ID.get(chip_id)
    if chip is None:
        problems.append(f"chip id {chip_id} is not a chip mpota knows")
    return {
        "kind": "app", "chip": chip, "chip_id": chip_id, "entry_point": entry,
        "min_chip_rev": _rev(min_rev), "max_chip_rev": _rev(max_rev),
        "segments": segments, "image_size": min(pos, len(data)), "file_size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "checksum": checksum, "hash_appended": digest,
        "hash_valid": None if digest is None else digest["valid"], "app": app,
        "valid": not problems, "problems": problems,
    }


def app_desc(version: str, secure_version: int = 0, project: str = "mpota-sim") -> bytes:
    v = version.encode()
    if len(v) > 31:
        raise ImageError(f"version {version!r} is longer than esp_app_desc_t allows (31 bytes)")
    return struct.pack("<II8s32s32s16s16s32s32s80s", APP_DESC_MAGIC, secure_version, b"", v,
                       project.encode()[:31], b"00:00:00", b"Nov 26 2026", b"v5.4-sim",
                       hashlib.sha256(v).digest(), b"")


def set_version(data: bytes, version: str) -> bytes:
    """The app image `data` with `version` in its esp_app_desc_t, checksum and appended SHA-256
    made right again: what an ESP-IDF build with PROJECT_VER set gives (stock MicroPython builds
    leave the version empty, CONFIG_APP_EXCLUDE_PROJECT_VER_VAR=y). For tests on real firmware;
    an image signed for secure boot would need signing again."""
    info = parse(data)  # checks it first
    out = bytearray(data[:info.length])
    at = HEADER_LEN + SEGMENT_HEADER_LEN + 16  # esp_app_desc_t.version
    v = version.encode()
    if len(v) > 31:
        raise ImageError(f"version {version!r} is longer than esp_app_desc_t allows (31 bytes)")
    out[at:at + 32] = v.ljust(32, b"\0")
    pos, csum = HEADER_LEN, 0xEF
    for _ in range(out[1]):
        _addr, n = struct.unpack_from("<II", out, pos)
        pos += SEGMENT_HEADER_LEN
        for b in out[pos:pos + n]:
            csum ^= b
        pos += n
    pos += 15 - pos % 16
    out[pos] = csum
    if out[23] == 1:
        out[pos + 1:pos + 33] = hashlib.sha256(out[:pos + 1]).digest()
    return bytes(out)


def build(segments: list[tuple[int, bytes]], chip: str, entry: int, min_rev: int = 0,
          max_rev: int = 0xFFFF) -> bytes:
    """An ESP app image from (load address, data) segments, with checksum and SHA-256.
    min_rev/max_rev: min_chip_rev_full / max_chip_rev_full (major * 100 + minor; 0xFFFF: none)."""
    chip_id = CHIPS[chip][0]
    out = bytearray(struct.pack("<BBBBI", IMAGE_MAGIC, len(segments), 2, 0x20, entry))
    # wp_pin, spi_pin_drv[3], chip_id, min_chip_rev, min_rev_full, max_rev_full, reserved, hash
    out += struct.pack("<B3sHBHH4sB", 0xEE, b"", chip_id, min_rev // 100, min_rev, max_rev, b"", 1)
    csum = 0xEF
    for addr, data in segments:
        if len(data) % 4:
            data = data + b"\0" * (4 - len(data) % 4)
        out += struct.pack("<II", addr, len(data)) + data
        for b in data:
            csum ^= b
    out += b"\0" * (15 - len(out) % 16) + bytes([csum])
    out += hashlib.sha256(out).digest()
    return bytes(out)


def build_sim_firmware(version: str, behavior: str = "healthy", size: int = 128 * 1024,
                       chip: str = "esp32", secure_version: int = 0, min_rev: int = 0,
                       max_rev: int = 0xFFFF) -> bytes:
    """A simulated firmware image of about `size` bytes that esptool accepts.

    The first segment (DROM) holds esp_app_desc_t, then the behaviour marker the unix board's
    bootloader reads, then filler derived from the version (so every version hashes
    differently, reproducibly). A small IRAM segment holds the entry point.
    """
    if behavior not in BEHAVIORS:
        raise ImageError(f"unknown behavior {behavior!r}", hint="choose one of " + ", ".join(BEHAVIORS))
    if chip not in CHIPS:
        raise ImageError(f"unknown chip {chip!r}", hint="choose one of " + ", ".join(CHIPS))
    marker = (SIM_MARKER + behavior.encode()).ljust(64, b"\0")
    head = app_desc(version, secure_version) + marker
    filler_len = max(0, size - len(head) - 256) // 4 * 4
    # Code-like filler: random picks from 256 random 8-byte "instructions", so it deflates
    # about as well as real firmware does, and differs for every version.
    rng = random.Random(f"{chip}/{version}/{behavior}")
    words = [rng.randbytes(8) for _ in range(256)]
    filler = b"".join(rng.choices(words, k=filler_len // 8 + 1))[:filler_len]
    iram = _IRAM[chip]
    return build([(CHIPS[chip][1], head + filler), (iram, b"\x00" * 64)], chip, iram, min_rev, max_rev)
