# The ESP-IDF second-stage bootloader of the simulated ESP32, as a module run as a script:
#     MPOTA_FLASH=flash.bin micropython -m bootloader
# It follows bootloader_utility_get_selected_boot_partition() with
# CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE, and prints one JSON line for the simulator:
#   {"slot": "ota_1", "index": 1, "version": "2.0.0", "behavior": "healthy", "states": [...]}
# or {"error": "..."} when no slot holds a bootable image (a bricked device).
#   1. every otadata record in PENDING_VERIFY becomes ABORTED (the app it named never
#      confirmed itself before this reset);
#   2. the active record (valid CRC, not INVALID/ABORTED, highest seq) picks slot
#      (seq - 1) % number_of_slots; with no active record the first OTA slot boots (no factory
#      app in these partition tables);
#   3. a NEW record becomes PENDING_VERIFY (the app must confirm itself during this boot);
#   4. the image in the chosen slot must pass esp_image_verify(); if it does not, the
#      bootloader tries the slots below it, then the ones above it.
import json
import idf
from flash import flash

MARKER = b"MPOTA-SIM behavior="


def behavior(offset):
    buf = bytearray(64)
    flash().read(offset + 32 + 256, buf)
    if buf.startswith(MARKER):
        return bytes(buf[len(MARKER):]).split(b"\0")[0].decode()
    return "healthy"  # a real firmware image: it behaves as its main.py says


def boot():
    slots = idf.ota_slots()
    recs = idf.read_otadata()
    for i in range(2):
        if recs[i][2] == idf.PENDING_VERIFY:
            recs[i][2] = idf.ABORTED
            idf.write_otadata(recs, i, fix_crc=False)
    active = idf.active_otadata(recs)
    index = 0
    if active != -1:
        index = idf.slot_of_seq(recs[active][0], len(slots))
        if recs[active][2] == idf.NEW:
            recs[active][2] = idf.PENDING_VERIFY
            idf.write_otadata(recs, active, fix_crc=False)
    order = [index] + list(range(index - 1, -1, -1)) + list(range(index + 1, len(slots)))
    for i in order:
        t, st, off, size, label = slots[i]
        try:
            idf.verify_image(off, size)
        except OSError:
            continue
        desc = idf.app_desc(off)
        return {"slot": label, "index": i, "offset": off,
                "version": desc[0] if desc else None,
                "secure_version": desc[1] if desc else None,
                "behavior": behavior(off),
                "fallback": i != index,
                "states": [[r[0], r[2]] for r in recs]}
    return {"error": "no bootable app image in any OTA slot"}


print(json.dumps(boot()))
flash().flush()
