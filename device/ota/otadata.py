# The agent's reader of ESP-IDF's otadata partition. esp32.Partition has no state query, so
# we read the two esp_ota_select_entry_t records ourselves: one at the start of each of the
# partition's two 4096-byte sectors, 32 bytes each:
#   uint32 ota_seq | uint8 seq_label[20] | uint32 ota_state | uint32 crc
# crc = CRC-32 (ROM crc32_le, init 0xFFFFFFFF) over ota_seq only. A record counts when
# seq != 0xFFFFFFFF and its CRC matches; it names OTA slot (seq - 1) % number_of_slots.
# The bootloader boots the valid, non-INVALID/ABORTED record with the highest seq.
import struct
from binascii import crc32

NAMES = {0: "NEW", 1: "PENDING_VERIFY", 2: "VALID", 3: "INVALID", 4: "ABORTED",
         0xFFFFFFFF: "UNDEFINED"}


def partition():
    from esp32 import Partition
    found = Partition.find(Partition.TYPE_DATA, 0)
    return found[0] if found else None


def records(part=None):
    # [(seq, state_name, sector), ...] for the records that are present and intact.
    part = part or partition()
    if part is None:
        return []
    out = []
    buf = bytearray(32)
    for i in range(2):
        part.readblocks(i, buf, 0)
        seq, _label, state, crc = struct.unpack("<I20sII", buf)
        if seq == 0xFFFFFFFF or crc != crc32(buf[0:4], 0xFFFFFFFF) & 0xFFFFFFFF:
            continue
        out.append((seq, NAMES.get(state, "UNKNOWN"), i))
    return out


def next_sector(recs):
    # The sector esp_ota_set_boot_partition() rewrites: the one the active record is not in,
    # sector 0 when no record is active (esp_rewrite_ota_data()).
    top = None
    for r in recs:
        if r[1] != "INVALID" and r[1] != "ABORTED" and (top is None or r[0] > top[0]):
            top = r
    return 0 if top is None else 1 - top[2]


def erase_sector(i):
    # What set_boot() does first anyway; done by the agent beforehand so that any record in
    # this sector after a reboot was written by this set_boot, not left from an older one.
    partition().ioctl(6, i)


def slot_states(nslots, recs):
    # {slot_index: state_name}; of two records naming one slot, the newer (higher seq) wins.
    best = {}
    for seq, name, _sector in recs:
        i = (seq - 1) % nslots
        if i not in best or seq > best[i][0]:
            best[i] = (seq, name)
    return {i: v[1] for i, v in best.items()}


def active(nslots, recs):
    # (slot_index, state_name) of the record the bootloader follows, or None (no record:
    # the first slot boots, as after flashing with esptool).
    top = None
    for seq, name, _sector in recs:
        if name == "INVALID" or name == "ABORTED":
            continue
        if top is None or seq > top[0]:
            top = (seq, name)
    if top is None:
        return None
    return (top[0] - 1) % nslots, top[1]
