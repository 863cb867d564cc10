# HMAC-SHA256 (RFC 2104) over the firmware's hashlib.sha256, for the fleet reports' signature
# (ota/fleet.py): no extra firmware module. SHA-256 works on 64-byte blocks, so the key is padded
# to 64 bytes (hashed first if longer) and XORed with 0x36 (inner) and 0x5C (outer).
# Streaming: update() as often as needed (the report body goes through in parts, never joined).
# tests/test_fleet_device.py checks it against CPython's hmac with the RFC 4231 vectors.
from micropython import const
import hashlib

_BLOCK = const(64)


class HMAC:
    def __init__(self, key, msg=None):
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        k = bytearray(_BLOCK)
        k[:len(key)] = key
        for i in range(_BLOCK):
            k[i] ^= 0x36
        self._inner = hashlib.sha256(k)
        for i in range(_BLOCK):
            k[i] ^= 0x36 ^ 0x5C  # from the inner pad to the outer one
        self._outer_key = k
        if msg is not None:
            self._inner.update(msg)

    def update(self, data):
        self._inner.update(data)

    def digest(self):
        # once: MicroPython's hash objects end with digest()
        outer = hashlib.sha256(self._outer_key)
        outer.update(self._inner.digest())
        return outer.digest()

    def hexdigest(self):
        from binascii import hexlify
        return hexlify(self.digest()).decode()


def new(key, msg=None):
    return HMAC(key, msg)
