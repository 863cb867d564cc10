# The parts of ESP-IDF that the simulated ESP32 needs, written from ESP-IDF's sources:
#   - the partition table at 0x8000 (esp_partition_info_t, MD5 entry),
#   - otadata (esp_ota_select_entry_t) and the active-record rules of bootloader_common.c,
#   - esp_rewrite_ota_data() and esp_ota_current_ota_is_workable() from esp_ota_ops.c,
#   (esp_image_verify() is in idfimage.py, loaded by esp32.py's set_boot() for the check alone,
#   and by the bootloader).
# What the simulated chip and its build are comes from the simulator's environment:
#   MPOTA_ROLLBACK   "on" (CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE in bootloader and app, as in
#                    MicroPython's sdkconfig.base), "off" (in neither), "bootloader-off" (an app
#                    built with it on a bootloader built without it)
# This module is the emulated *platform*. The agent under test (device/ota) has its own
# otadata reader; the two are kept apart on purpose so one cannot hide the other's bug.
import os
import struct
import binascii
import hashlib
from flash import flash, SECTOR

def rollback(where):
    # Is CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE set in the "app" or the "bootloader" build?
    mode = os.getenv("MPOTA_ROLLBACK") or "on"
    return mode == "on" or (where == "app" and mode == "bootloader-off")

PARTITION_TABLE_OFFSET = 0x8000
TYPE_APP = 0
TYPE_DATA = 1
SUBTYPE_OTA_0 = 0x10
SUBTYPE_OTADATA = 0x00

# esp_ota_img_states_t
NEW = 0
PENDING_VERIFY = 1
VALID = 2
INVALID = 3
ABORTED = 4
UNDEFINED = 0xFFFFFFFF


_table = None


def partitions():
    # [(type, subtype, offset, size, label)] read from the binary table in flash (once: nothing
    # writes it while the device runs).
    global _table
    if _table is None:
        _table = _read_table()
    return _table


def _read_table():
    out = []
    buf = bytearray(32)
    md5 = hashlib.md5() if hasattr(hashlib, "md5") else None
    for i in range(0xC00 // 32):
        flash().read(PARTITION_TABLE_OFFSET + 32 * i, buf)
        if buf[0] == 0xAA and buf[1] == 0x50:
            _m, t, st, off, size, label, _fl = struct.unpack("<HBBII16sI", buf)
            out.append((t, st, off, size, label.split(b"\0")[0].decode()))
            if md5:
                md5.update(buf)
        elif buf[0] == 0xEB and buf[1] == 0xEB:
            if md5 and md5.digest() != bytes(buf[16:]):
                raise OSError(5)  # partition table MD5 mismatch: the ROM would not boot
            break
        else:
            break
    if not out:
        raise OSError(2)  # no partition table
    return out


def find(ptype, subtype=0xFF, label=None):
    return [p for p in partitions()
            if p[0] == ptype and (subtype == 0xFF or p[1] == subtype)
            and (label is None or p[4] == label)]


def ota_slots():
    return sorted((p for p in partitions() if p[0] == TYPE_APP and 0x10 <= p[1] < 0x20),
                  key=lambda p: p[1])


def otadata_partition():
    found = find(TYPE_DATA, SUBTYPE_OTADATA)
    return found[0] if found else None


def select_crc(seq):
    # bootloader_common_ota_select_crc(): esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4)
    return binascii.crc32(struct.pack("<I", seq), 0xFFFFFFFF) & 0xFFFFFFFF


def read_otadata():
    # Two 32-byte records, one at the start of each of the partition's two sectors.
    part = otadata_partition()
    recs = []
    buf = bytearray(32)
    for i in range(2):
        flash().read(part[2] + SECTOR * i, buf)
        seq, label, state, crc = struct.unpack("<I20sII", buf)
        recs.append([seq, label, state, crc])
    return recs


def record_valid(r):
    # bootloader_common_ota_select_valid()
    return (r[0] != 0xFFFFFFFF and r[2] != INVALID and r[2] != ABORTED
            and r[3] == select_crc(r[0]))


def active_otadata(recs):
    # bootloader_common_get_active_otadata(): highest seq among valid records, 0 on a tie.
    v0, v1 = record_valid(recs[0]), record_valid(recs[1])
    if v0 and v1:
        return 0 if max(recs[0][0], recs[1][0]) == recs[0][0] else 1
    if v0:
        return 0
    if v1:
        return 1
    return -1


def write_otadata(recs, i, seq=None, fix_crc=True):
    # rewrite_ota_seq(): erase the record's sector, then write the 32-byte record (the app
    # recomputes the CRC; the bootloader's write_otadata() writes the record as it read it).
    r = recs[i]
    if seq is not None:
        r[0] = seq
    if fix_crc:
        r[3] = select_crc(r[0])
    part = otadata_partition()
    flash().erase(part[2] + SECTOR * i, SECTOR)
    flash().write(part[2] + SECTOR * i, struct.pack("<I20sII", r[0], r[1], r[2], r[3]))


def state_of_slot(index, nslots):
    # esp_ota_get_state_partition(): the state of the first record (sector 0, then 1) with a
    # good CRC that names the slot, or None (ESP_ERR_NOT_FOUND).
    for r in read_otadata():
        if r[0] != 0xFFFFFFFF and r[3] == select_crc(r[0]) and slot_of_seq(r[0], nslots) == index:
            return r[2]
    return None


def slot_of_seq(seq, nslots):
    return (seq - 1) % nslots


def set_boot(slot_index, nslots):
    # esp_rewrite_ota_data(): the new record is NEW with CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE,
    # UNDEFINED without it.
    state = NEW if rollback("app") else UNDEFINED
    recs = read_otadata()
    active = active_otadata(recs)
    base = (slot_index + 1) % nslots
    if active != -1:
        seq = recs[active][0]
        i = 0
        while seq > base + i * nslots:
            i += 1
        nxt = (~active) & 1
        recs[nxt][2] = state
        write_otadata(recs, nxt, base + i * nslots)
    else:
        recs[0][2] = state
        write_otadata(recs, 0, slot_index + 1)


def mark_running_valid():
    # esp_ota_current_ota_is_workable(true): the *active* record becomes VALID, whichever slot
    # it names (ESP-IDF does not compare it with the running slot); ESP_FAIL (OSError(1) from
    # MicroPython's check_esp_err) when no record is active.
    recs = read_otadata()
    active = active_otadata(recs)
    if active == -1:
        raise OSError(1)
    if recs[active][2] != VALID:
        recs[active][2] = VALID
        write_otadata(recs, active)
