# esp_image_verify() of the simulated ESP32 (components/bootloader_support/src/esp_image_format.c),
# for esp32.Partition.set_boot() and the bootloader; a module of its own so that the app pays for
# it in heap only when it sets a slot to boot. The chip's revision comes from MPOTA_CHIP_REV:
# efuse_hal_chip_revision(), major * 100 + minor (default 300, an ESP32 v3.0).
import os
import struct
import hashlib
from flash import flash

CHIP_ID = 0  # the unix board emulates an ESP32 (esp_chip_id_t ESP_CHIP_ID_ESP32)


def chip_revision():
    return int(os.getenv("MPOTA_CHIP_REV") or 300)


IMAGE_MAGIC = 0xE9
APP_DESC_MAGIC = 0xABCD5432


def verify_image(part_offset, part_size):
    # Returns the image length (with checksum and SHA-256) or raises OSError like ESP-IDF's
    # esp_image_verify() would make esp_ota_set_boot_partition() fail.
    f = flash()
    hdr = bytearray(24)
    f.read(part_offset, hdr)
    if hdr[0] != IMAGE_MAGIC or not chip_valid(hdr):
        raise OSError(-0x1503)  # ESP_ERR_IMAGE_INVALID
    nseg = hdr[1]
    hash_appended = hdr[23] == 1
    if nseg == 0 or nseg > 16:
        raise OSError(-0x1503)
    sha = hashlib.sha256(hdr)
    pos = 24
    csum = 0xEF
    seghdr = bytearray(8)
    buf = f._old  # the flash's 256-byte scratch: reads do not touch it, and we only read here
    for _ in range(nseg):
        if pos + 8 > part_size:
            raise OSError(-0x1503)
        f.read(part_offset + pos, seghdr)
        sha.update(seghdr)
        _addr, n = struct.unpack("<II", seghdr)
        pos += 8
        if n % 4 or pos + n > part_size:
            raise OSError(-0x1503)
        while n:
            k = min(n, len(buf))
            mv = memoryview(buf)[:k]
            f.read(part_offset + pos, mv)
            sha.update(mv)
            for b in mv:
                csum ^= b
            pos += k
            n -= k
    # Padding up to a 16-byte boundary, the last byte of which is the checksum.
    pad = 15 - (pos % 16)
    tail = bytearray(pad + 1)
    f.read(part_offset + pos, tail)
    sha.update(tail)
    if tail[-1] != csum:
        raise OSError(-0x1503)
    pos += pad + 1
    if hash_appended:
        digest = bytearray(32)
        f.read(part_offset + pos, digest)
        if sha.digest() != digest:
            raise OSError(-0x1503)
        pos += 32
    return pos


def chip_valid(hdr):
    # bootloader_common_check_chip_validity(hdr, ESP_IMAGE_APPLICATION): the image's chip id
    # must be this chip's; its min_chip_rev_full must not be above the chip's revision; its
    # max_chip_rev_full, when set (not 0 and not 0xFFFF), must not be below it.
    chip_id, _min_old, min_rev, max_rev = struct.unpack_from("<HBHH", hdr, 12)
    rev = chip_revision()
    if chip_id != CHIP_ID or rev < min_rev:
        return False
    return max_rev in (0, 0xFFFF) or rev <= max_rev


def app_desc(part_offset):
    # (version, secure_version, project_name) from esp_app_desc_t at the first segment.
    buf = bytearray(256)
    flash().read(part_offset + 32, buf)
    magic, secure_version = struct.unpack("<II", buf)
    if magic != APP_DESC_MAGIC:
        return None
    version = bytes(buf[16:48]).split(b"\0")[0].decode()
    project = bytes(buf[48:80]).split(b"\0")[0].decode()
    return version, secure_version, project
