# SHA-512 (FIPS 180-4) in pure MicroPython, hashlib-like:
#
#   h = sha512(b"abc"); h.update(more); h.digest() -> 64 bytes
#
# Many MicroPython builds for ESP32 ship hashlib without sha512, which
# Ed25519 needs. Small ints there are 31 bits wide, so every 64-bit word
# is kept as two 32-bit halves (hi, lo) in array('I') buffers.
#
# The block function exists twice:
#   * ota/_sha512_viper.py: a @micropython.viper version (machine code,
#     machine-word arithmetic, written to give the same result on 32- and
#     64-bit ports). It is a module of its own, imported inside try/except:
#     where it cannot load (no native emitter, an .mpy built for another
#     architecture, the file left out) or gives a wrong answer on one known
#     block, the plain one (ota/_sha512_py.py) is used instead. As a real module it is
#     compiled ahead of time by mpy-cross like the rest of the agent; an
#     earlier version kept its source in a string and compiled it with
#     exec() at import, which cost about 1 ms and 10 KiB of heap on every
#     boot that imported this module.
#   * ota/_sha512_py.py: plain Python, about 50 times slower, loaded only where
#     the native one cannot be.
# Both are checked against CPython's hashlib by tests/test_sha512.py.
#
# RAM: one 160-word schedule buffer and the 160-word round constant table
# are allocated once per module (1280 bytes). Each hash object holds 16
# state words plus a 128-byte block buffer. Full blocks of the input are
# compressed straight out of the caller's buffer, without copying.
# The shared schedule buffer makes concurrent hashing from two threads
# unsafe; asyncio tasks are fine (compression never yields).

from array import array
from binascii import hexlify
from micropython import const

_BLOCK = const(128)

# Round constants K[0..79], 64 bits each, big-endian. Bytes, not hex text:
# a bytes constant is freed once the words are read out; hex text would
# stay interned (measured 700 bytes of heap less after import).
_K = (
    b"\x42\x8a\x2f\x98\xd7\x28\xae\x22\x71\x37\x44\x91\x23\xef\x65\xcd"
    b"\xb5\xc0\xfb\xcf\xec\x4d\x3b\x2f\xe9\xb5\xdb\xa5\x81\x89\xdb\xbc"
    b"\x39\x56\xc2\x5b\xf3\x48\xb5\x38\x59\xf1\x11\xf1\xb6\x05\xd0\x19"
    b"\x92\x3f\x82\xa4\xaf\x19\x4f\x9b\xab\x1c\x5e\xd5\xda\x6d\x81\x18"
    b"\xd8\x07\xaa\x98\xa3\x03\x02\x42\x12\x83\x5b\x01\x45\x70\x6f\xbe"
    b"\x24\x31\x85\xbe\x4e\xe4\xb2\x8c\x55\x0c\x7d\xc3\xd5\xff\xb4\xe2"
    b"\x72\xbe\x5d\x74\xf2\x7b\x89\x6f\x80\xde\xb1\xfe\x3b\x16\x96\xb1"
    b"\x9b\xdc\x06\xa7\x25\xc7\x12\x35\xc1\x9b\xf1\x74\xcf\x69\x26\x94"
    b"\xe4\x9b\x69\xc1\x9e\xf1\x4a\xd2\xef\xbe\x47\x86\x38\x4f\x25\xe3"
    b"\x0f\xc1\x9d\xc6\x8b\x8c\xd5\xb5\x24\x0c\xa1\xcc\x77\xac\x9c\x65"
    b"\x2d\xe9\x2c\x6f\x59\x2b\x02\x75\x4a\x74\x84\xaa\x6e\xa6\xe4\x83"
    b"\x5c\xb0\xa9\xdc\xbd\x41\xfb\xd4\x76\xf9\x88\xda\x83\x11\x53\xb5"
    b"\x98\x3e\x51\x52\xee\x66\xdf\xab\xa8\x31\xc6\x6d\x2d\xb4\x32\x10"
    b"\xb0\x03\x27\xc8\x98\xfb\x21\x3f\xbf\x59\x7f\xc7\xbe\xef\x0e\xe4"
    b"\xc6\xe0\x0b\xf3\x3d\xa8\x8f\xc2\xd5\xa7\x91\x47\x93\x0a\xa7\x25"
    b"\x06\xca\x63\x51\xe0\x03\x82\x6f\x14\x29\x29\x67\x0a\x0e\x6e\x70"
    b"\x27\xb7\x0a\x85\x46\xd2\x2f\xfc\x2e\x1b\x21\x38\x5c\x26\xc9\x26"
    b"\x4d\x2c\x6d\xfc\x5a\xc4\x2a\xed\x53\x38\x0d\x13\x9d\x95\xb3\xdf"
    b"\x65\x0a\x73\x54\x8b\xaf\x63\xde\x76\x6a\x0a\xbb\x3c\x77\xb2\xa8"
    b"\x81\xc2\xc9\x2e\x47\xed\xae\xe6\x92\x72\x2c\x85\x14\x82\x35\x3b"
    b"\xa2\xbf\xe8\xa1\x4c\xf1\x03\x64\xa8\x1a\x66\x4b\xbc\x42\x30\x01"
    b"\xc2\x4b\x8b\x70\xd0\xf8\x97\x91\xc7\x6c\x51\xa3\x06\x54\xbe\x30"
    b"\xd1\x92\xe8\x19\xd6\xef\x52\x18\xd6\x99\x06\x24\x55\x65\xa9\x10"
    b"\xf4\x0e\x35\x85\x57\x71\x20\x2a\x10\x6a\xa0\x70\x32\xbb\xd1\xb8"
    b"\x19\xa4\xc1\x16\xb8\xd2\xd0\xc8\x1e\x37\x6c\x08\x51\x41\xab\x53"
    b"\x27\x48\x77\x4c\xdf\x8e\xeb\x99\x34\xb0\xbc\xb5\xe1\x9b\x48\xa8"
    b"\x39\x1c\x0c\xb3\xc5\xc9\x5a\x63\x4e\xd8\xaa\x4a\xe3\x41\x8a\xcb"
    b"\x5b\x9c\xca\x4f\x77\x63\xe3\x73\x68\x2e\x6f\xf3\xd6\xb2\xb8\xa3"
    b"\x74\x8f\x82\xee\x5d\xef\xb2\xfc\x78\xa5\x63\x6f\x43\x17\x2f\x60"
    b"\x84\xc8\x78\x14\xa1\xf0\xab\x72\x8c\xc7\x02\x08\x1a\x64\x39\xec"
    b"\x90\xbe\xff\xfa\x23\x63\x1e\x28\xa4\x50\x6c\xeb\xde\x82\xbd\xe9"
    b"\xbe\xf9\xa3\xf7\xb2\xc6\x79\x15\xc6\x71\x78\xf2\xe3\x72\x53\x2b"
    b"\xca\x27\x3e\xce\xea\x26\x61\x9c\xd1\x86\xb8\xc7\x21\xc0\xc2\x07"
    b"\xea\xda\x7d\xd6\xcd\xe0\xeb\x1e\xf5\x7d\x4f\x7f\xee\x6e\xd1\x78"
    b"\x06\xf0\x67\xaa\x72\x17\x6f\xba\x0a\x63\x7d\xc5\xa2\xc8\x98\xa6"
    b"\x11\x3f\x98\x04\xbe\xf9\x0d\xae\x1b\x71\x0b\x35\x13\x1c\x47\x1b"
    b"\x28\xdb\x77\xf5\x23\x04\x7d\x84\x32\xca\xab\x7b\x40\xc7\x24\x93"
    b"\x3c\x9e\xbe\x0a\x15\xc9\xbe\xbc\x43\x1d\x67\xc4\x9c\x10\x0d\x4c"
    b"\x4c\xc5\xd4\xbe\xcb\x3e\x42\xb6\x59\x7f\x29\x9c\xfc\x65\x7e\x2a"
    b"\x5f\xcb\x6f\xab\x3a\xd6\xfa\xec\x6c\x44\x19\x8c\x4a\x47\x58\x17"
)

# Initial hash value H(0).
_IV = (
    b"\x6a\x09\xe6\x67\xf3\xbc\xc9\x08\xbb\x67\xae\x85\x84\xca\xa7\x3b"
    b"\x3c\x6e\xf3\x72\xfe\x94\xf8\x2b\xa5\x4f\xf5\x3a\x5f\x1d\x36\xf1"
    b"\x51\x0e\x52\x7f\xad\xe6\x82\xd1\x9b\x05\x68\x8c\x2b\x3e\x6c\x1f"
    b"\x1f\x83\xd9\xab\xfb\x41\xbd\x6b\x5b\xe0\xcd\x19\x13\x7e\x21\x79"
)


def _words(raw):
    # big-endian bytes -> array of 32-bit words
    n = len(raw) >> 2
    a = array("I", bytes(n << 2))
    for i in range(n):
        j = i << 2
        a[i] = (raw[j] << 24) | (raw[j + 1] << 16) | (raw[j + 2] << 8) | raw[j + 3]
    return a


_K = _words(_K)
_IV = _words(_IV)
# Message schedule: W[t] as (hi, lo) at indexes 2t, 2t+1; reused by every block.
_W = array("I", bytes(640))


# SHA-512("abc"), for the self-test in _select()
_ABC = (
    b"\xdd\xaf\x35\xa1\x93\x61\x7a\xba\xcc\x41\x73\x49\xae\x20\x41\x31"
    b"\x12\xe6\xfa\x4e\x89\xa9\x7e\xa2\x0a\x9e\xee\xe6\x4b\x55\xd3\x9a"
    b"\x21\x92\x99\x2a\x27\x4f\xc1\xa8\x36\xba\x3c\x23\xa3\xfe\xeb\xbd"
    b"\x45\x4d\x44\x23\x64\x3c\xe8\x0e\x2a\x9a\xc9\x4f\xa5\x4c\xa4\x9f"
)


def _select():
    # The native version if it loads and computes one known block right,
    # else None. Any exception counts as "cannot load": SyntaxError (no
    # native emitter), ValueError (incompatible .mpy), ImportError (file
    # missing), MemoryError (the plain version needs no more memory, and
    # the caller's next allocation reports a real shortage). The self-test
    # guards against ports whose viper code generation was never tested
    # here.
    try:
        try:
            from ._sha512_viper import compress as f
        except ImportError:
            from _sha512_viper import compress as f  # used outside the ota package
        h = array("I", _IV)
        blk = bytearray(_BLOCK)
        blk[0:4] = b"abc\x80"
        blk[-1] = 24  # message length in bits
        f(h, _W, _K, blk, 1)
        if bytes(h) == bytes(_words(_ABC)):
            return f
    except Exception:
        pass
    return None


def _plain():
    try:
        from ._sha512_py import compress
    except ImportError:
        from _sha512_py import compress  # used outside the ota package
    return compress


_compress_viper = _select()
# The block function in use: the plain one is loaded only where the native one cannot be (its
# code would otherwise take heap next to Ed25519's). Tests may swap in _plain() to check it.
_compress = _compress_viper or _plain()


class sha512:
    digest_size = 64
    block_size = 128
    name = "sha512"

    def __init__(self, data=None):
        self._h = array("I", _IV)
        self._buf = bytearray(_BLOCK)
        self._n = 0  # total bytes hashed so far
        if data is not None:
            self.update(data)

    def update(self, data):
        # data: bytes, bytearray or a memoryview of bytes (a memoryview of
        # a wider array type would be counted in items, not bytes)
        mv = memoryview(data)
        n = len(mv)
        if not n:
            return
        fill = self._n & (_BLOCK - 1)
        self._n += n
        pos = 0
        if fill:
            pos = _BLOCK - fill
            if n < pos:
                self._buf[fill:fill + n] = mv
                return
            self._buf[fill:] = mv[:pos]
            _compress(self._h, _W, _K, self._buf, 1)
        nb = (n - pos) >> 7
        if nb:
            end = pos + (nb << 7)
            _compress(self._h, _W, _K, mv[pos:end], nb)
            pos = end
        if pos < n:
            self._buf[:n - pos] = mv[pos:]

    def digest(self):
        # Pad a copy so the object stays usable (digest twice, update after).
        h = array("I", self._h)
        fill = self._n & (_BLOCK - 1)
        nb = 1 if fill < 112 else 2
        pad = bytearray(nb << 7)
        pad[:fill] = self._buf[:fill]
        pad[fill] = 0x80
        pad[-16:] = (self._n << 3).to_bytes(16, "big")
        _compress(h, _W, _K, pad, nb)
        out = bytearray(64)
        for i in range(16):
            v = h[i]
            j = i << 2
            out[j] = v >> 24
            out[j + 1] = (v >> 16) & 0xFF
            out[j + 2] = (v >> 8) & 0xFF
            out[j + 3] = v & 0xFF
        return bytes(out)

    def hexdigest(self):
        return hexlify(self.digest()).decode()

    def copy(self):
        c = sha512()
        c._h = array("I", self._h)
        c._buf = bytearray(self._buf)
        c._n = self._n
        return c
