# ESP app image checks the agent makes on the first block it receives, before anything is
# written: esp_image_header_t (magic 0xE9, chip id) and esp_app_desc_t (magic, version).
# Takes bytes, does no I/O.
import struct
from ota.errors import OtaError

IMAGE_MAGIC = 0xE9
# The agent writes an image's first byte (the magic) last: block 0 goes to flash with 0xFF there,
# and only when the whole slot has been read back and matched the signed hash is 0xE9 written
# (a write without erase, clearing bits). Until then no bootloader takes the slot for an image.
_DESC_MAGIC = 0xABCD5432
_DESC_AT = 32    # 24-byte image header + 8-byte segment header, then esp_app_desc_t


def parse_app_desc(buf):
    # buf: the first 96+ bytes of an image -> (version, secure_version) or (None, 0).
    if len(buf) < _DESC_AT + 48 or buf[0] != IMAGE_MAGIC:
        return None, 0
    magic, secure = struct.unpack_from("<II", buf, _DESC_AT)
    if magic != _DESC_MAGIC:
        return None, 0
    v = bytes(buf[_DESC_AT + 16:_DESC_AT + 48])
    end = v.find(b"\0")
    try:
        return (v if end < 0 else v[:end]).decode(), secure
    except UnicodeError:  # not text: no version we could ever match
        return None, 0


def check_first_block(buf, chip_id, version):
    # Refuse a payload that is not an app image for this chip, or whose embedded version is
    # not the one the signed manifest promised. Returns the image's secure_version.
    if len(buf) < _DESC_AT + 48 or buf[0] != IMAGE_MAGIC:
        raise OtaError("bad-image", "payload does not start with an ESP app image header (0xE9)")
    got = buf[12] | (buf[13] << 8)
    if got != chip_id:
        raise OtaError("wrong-chip", "image is for chip id %d, this device is chip id %d" % (got, chip_id))
    v, secure = parse_app_desc(buf)
    if v is None:
        raise OtaError("bad-image", "image has no esp_app_desc_t with a readable version")
    if v != version:
        raise OtaError("version-mismatch", "image says version %s, manifest says %s" % (v, version))
    return secure
