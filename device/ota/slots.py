# The device's OTA app slots, through esp32.Partition (the one module that touches the
# platform; the unix board supplies an emulated esp32 with the same API).
from esp32 import Partition


def ota_slots():
    # OTA app partitions (subtypes ota_0..ota_15) in slot order.
    found = [p for p in Partition.find(Partition.TYPE_APP) if 0x10 <= p.info()[1] < 0x20]
    found.sort(key=lambda p: p.info()[1])
    return found


def running():
    return Partition(Partition.RUNNING)


def index_of(part, slots):
    addr = part.info()[2]
    for i in range(len(slots)):
        if slots[i].info()[2] == addr:
            return i
    return -1


def read_app_desc(part):
    # (version, secure_version) from the esp_app_desc_t of the image in `part`, or (None, 0).
    from ota.image import parse_app_desc
    buf = bytearray(96)
    part.readblocks(0, buf, 0)
    return parse_app_desc(buf)
