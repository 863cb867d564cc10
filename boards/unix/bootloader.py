# The ESP-IDF second-stage bootloader of the simulated ESP32, as a module run as a script:
#     MPOTA_FLASH=flash.bin micropython -m bootloader
# It prints one JSON line for the simulator:
#   {"slot": "ota_1", "index": 1, "version": "2.0.0", "behavior": "healthy", "states": [...]}
# or {"error": "..."} when no slot holds a bootable image (a bricked device).
# It follows ESP-IDF v5.x (components/bootloader/subproject/main/bootloader_start.c and
# components/bootloader_support/src/bootloader_utility.c), with MicroPython's sdkconfig.base:
#   0. a wake from deep sleep (MPOTA_WAKE_SLOT names the partition kept in RTC memory) boots
#      that partition again without looking at otadata and without verifying the image
#      (bootloader_utility_load_boot_image_from_deep_sleep(),
#      CONFIG_BOOTLOADER_SKIP_VALIDATE_IN_DEEP_SLEEP=y); if it does not load, a normal boot follows;
#   1. with rollback (CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE; MPOTA_ROLLBACK, see idf.py) every
#      otadata record in PENDING_VERIFY becomes ABORTED: the app it named never confirmed itself
#      (bootloader_utility_get_selected_boot_partition());
#   2. both records unusable (empty, INVALID or ABORTED): ota_0 boots; if both are empty or have
#      a bad CRC (a board just flashed), the first image that loads gets the record {seq = its
#      index + 1, VALID} in sector 0 (set_actual_ota_seq());
#   3. otherwise the active record (valid CRC, not INVALID/ABORTED, highest seq) picks slot
#      (seq - 1) % number_of_slots; with rollback, a NEW record becomes PENDING_VERIFY: the app
#      must confirm itself during this boot; no active record: every slot is tried from ota_0;
#   4. the chosen image must pass esp_image_verify() (chip id and revision included); if it does
#      not, the slots below it, then the ones above it are tried (bootloader_utility_load_boot_image());
#      otadata is not rewritten for such a fallback.
import json
import os
import idf
import idfimage
from flash import flash

MARKER = b"MPOTA-SIM behavior="


def behavior(offset):
    buf = bytearray(64)
    flash().read(offset + 32 + 256, buf)
    if buf.startswith(MARKER):
        return bytes(buf[len(MARKER):]).split(b"\0")[0].decode()
    return "healthy"  # a real firmware image: it behaves as its main.py says


def _booted(slots, i, recs, **notes):
    t, st, off, size, label = slots[i]
    desc = idfimage.app_desc(off)
    out = {"slot": label, "index": i, "offset": off,
           "version": desc[0] if desc else None,
           "secure_version": desc[1] if desc else None,
           "behavior": behavior(off),
           "states": [[r[0], r[2]] for r in recs]}
    out.update(notes)
    return out


def _wake(slots, label):
    # bootloader_load_image_no_verify(): the header must still be an app image's
    for i in range(len(slots)):
        if slots[i][4] == label:
            hdr = bytearray(1)
            flash().read(slots[i][2], hdr)
            if hdr[0] == idfimage.IMAGE_MAGIC:
                return _booted(slots, i, idf.read_otadata(), wake=True)
    return None


def _blank(r):
    return r[0] == 0xFFFFFFFF or r[3] != idf.select_crc(r[0])


def _unusable(r):
    # bootloader_common_ota_select_invalid()
    return r[0] == 0xFFFFFFFF or r[2] == idf.INVALID or r[2] == idf.ABORTED


def boot():
    slots = idf.ota_slots()
    wake = os.getenv("MPOTA_WAKE_SLOT")
    if wake:
        sel = _wake(slots, wake)
        if sel:
            return sel
    recs = idf.read_otadata()
    rollback = idf.rollback("bootloader")
    if rollback:
        for i in range(2):
            if recs[i][2] == idf.PENDING_VERIFY:
                recs[i][2] = idf.ABORTED
                idf.write_otadata(recs, i, fix_crc=False)
    initial = False
    if _unusable(recs[0]) and _unusable(recs[1]):
        index = 0
        initial = _blank(recs[0]) and _blank(recs[1])
    else:
        active = idf.active_otadata(recs)
        index = 0
        if active != -1:
            index = idf.slot_of_seq(recs[active][0], len(slots))
            if rollback and recs[active][2] == idf.NEW:
                recs[active][2] = idf.PENDING_VERIFY
                idf.write_otadata(recs, active, fix_crc=False)
    order = [index] + list(range(index - 1, -1, -1)) + list(range(index + 1, len(slots)))
    for i in order:
        t, st, off, size, label = slots[i]
        try:
            idfimage.verify_image(off, size)
        except OSError:
            continue
        if initial:
            # set_actual_ota_seq(): a record in sector 0 for the slot that booted
            recs[0] = [i + 1, b"\xff" * 20, idf.VALID, 0]
            idf.write_otadata(recs, 0)
        return _booted(slots, i, recs, fallback=i != index)
    return {"error": "no bootable app image in any OTA slot"}


print(json.dumps(boot()))
flash().flush()
