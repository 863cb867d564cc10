# SHA-512 (FIPS 180-4) in pure MicroPython, hashlib-like:
#
#   h = sha512(b"abc"); h.update(more); h.digest() -> 64 bytes
#
# Many MicroPython builds for ESP32 ship hashlib without sha512, which
# Ed25519 needs. Small ints there are 31 bits wide, so every 64-bit word
# is kept as two 32-bit halves (hi, lo) in array('I') buffers.
#
# The block function exists twice:
#   * _VIPER_SRC: a @micropython.viper version (native code, machine-word
#     arithmetic, written to give the same result on 32- and 64-bit ports).
#     It is compiled with exec() at import, because a module that contains
#     a viper function fails to compile as a whole on a port without the
#     native emitter; exec lets us fall back instead.
#   * _compress_py: plain Python, used when viper is unavailable.
# Both are checked against CPython's hashlib by tests/test_sha512.py.
#
# RAM: one 160-word schedule buffer and the 160-word round constant table
# are allocated once per module (1280 bytes). Each hash object holds 16
# state words plus a 128-byte block buffer. Full blocks of the input are
# compressed straight out of the caller's buffer, without copying.
# The shared schedule buffer makes concurrent hashing from two threads
# unsafe; asyncio tasks are fine (compression never yields).

from array import array
from binascii import hexlify, unhexlify
from micropython import const

_BLOCK = const(128)

# Round constants K[0..79], 64 bits each, big-endian hex.
_K_HEX = (
    "428a2f98d728ae227137449123ef65cdb5c0fbcfec4d3b2fe9b5dba58189dbbc"
    "3956c25bf348b53859f111f1b605d019923f82a4af194f9bab1c5ed5da6d8118"
    "d807aa98a303024212835b0145706fbe243185be4ee4b28c550c7dc3d5ffb4e2"
    "72be5d74f27b896f80deb1fe3b1696b19bdc06a725c71235c19bf174cf692694"
    "e49b69c19ef14ad2efbe4786384f25e30fc19dc68b8cd5b5240ca1cc77ac9c65"
    "2de92c6f592b02754a7484aa6ea6e4835cb0a9dcbd41fbd476f988da831153b5"
    "983e5152ee66dfaba831c66d2db43210b00327c898fb213fbf597fc7beef0ee4"
    "c6e00bf33da88fc2d5a79147930aa72506ca6351e003826f142929670a0e6e70"
    "27b70a8546d22ffc2e1b21385c26c9264d2c6dfc5ac42aed53380d139d95b3df"
    "650a73548baf63de766a0abb3c77b2a881c2c92e47edaee692722c851482353b"
    "a2bfe8a14cf10364a81a664bbc423001c24b8b70d0f89791c76c51a30654be30"
    "d192e819d6ef5218d69906245565a910f40e35855771202a106aa07032bbd1b8"
    "19a4c116b8d2d0c81e376c085141ab532748774cdf8eeb9934b0bcb5e19b48a8"
    "391c0cb3c5c95a634ed8aa4ae3418acb5b9cca4f7763e373682e6ff3d6b2b8a3"
    "748f82ee5defb2fc78a5636f43172f6084c87814a1f0ab728cc702081a6439ec"
    "90befffa23631e28a4506cebde82bde9bef9a3f7b2c67915c67178f2e372532b"
    "ca273eceea26619cd186b8c721c0c207eada7dd6cde0eb1ef57d4f7fee6ed178"
    "06f067aa72176fba0a637dc5a2c898a6113f9804bef90dae1b710b35131c471b"
    "28db77f523047d8432caab7b40c724933c9ebe0a15c9bebc431d67c49c100d4c"
    "4cc5d4becb3e42b6597f299cfc657e2a5fcb6fab3ad6faec6c44198c4a475817"
)

# Initial hash value H(0).
_IV_HEX = (
    "6a09e667f3bcc908bb67ae8584caa73b3c6ef372fe94f82ba54ff53a5f1d36f1"
    "510e527fade682d19b05688c2b3e6c1f1f83d9abfb41bd6b5be0cd19137e2179"
)


def _words(hexstr):
    # big-endian hex -> array of 32-bit words
    raw = unhexlify(hexstr)
    n = len(raw) >> 2
    a = array("I", bytes(n << 2))
    for i in range(n):
        j = i << 2
        a[i] = (raw[j] << 24) | (raw[j + 1] << 16) | (raw[j + 2] << 8) | raw[j + 3]
    return a


_K = _words(_K_HEX)
_IV = _words(_IV_HEX)
# Message schedule: W[t] as (hi, lo) at indexes 2t, 2t+1; reused by every block.
_W = array("I", bytes(640))
del _K_HEX, _IV_HEX


# ---------------------------------------------------------------------------
# Native block function (source compiled at import, see top of file).
#
# compress(H, W, K, buf, nblk): run nblk 128-byte blocks from buf (any
# buffer, starting at offset 0) into the 16-word state H.
#
# Viper ints are machine words: 32 bits on ESP32, 64 bits on the unix port.
# So M masks to 32 bits wherever high garbage could matter (before right
# shifts and carry computations); ptr32 stores truncate by themselves.
# Carry out of lo + y (both < 2^32, s = (lo + y) & M) uses only logical
# operations, so it does not depend on signed/unsigned compares:
#   carry = ((lo & y) | ((lo | y) & ~s)) >> 31
_VIPER_SRC = """
@micropython.viper
def compress(H, W_, K_, buf, nblk: int):
    h = ptr32(H)
    w = ptr32(W_)
    k = ptr32(K_)
    b = ptr8(buf)
    M = (uint(0xFFFF) << 16) | uint(0xFFFF)
    off = 0
    while nblk > 0:
        nblk -= 1
        t = 0
        while t < 32:
            j = off + (t << 2)
            w[t] = (b[j] << 24) | (b[j + 1] << 16) | (b[j + 2] << 8) | b[j + 3]
            t += 1
        off += 128
        while t < 160:
            xh = uint(w[t - 4])
            xl = uint(w[t - 3])
            hi = ((xh >> 19) | (xl << 13)) ^ ((xl >> 29) | (xh << 3)) ^ (xh >> 6)
            lo = (((xl >> 19) | (xh << 13)) ^ ((xh >> 29) | (xl << 3)) ^ ((xl >> 6) | (xh << 26))) & M
            xh = uint(w[t - 30])
            xl = uint(w[t - 29])
            yh = ((xh >> 1) | (xl << 31)) ^ ((xh >> 8) | (xl << 24)) ^ (xh >> 7)
            y = (((xl >> 1) | (xh << 31)) ^ ((xl >> 8) | (xh << 24)) ^ ((xl >> 7) | (xh << 25))) & M
            s = (lo + y) & M
            hi += yh + (((lo & y) | ((lo | y) & (s ^ M))) >> 31)
            lo = s
            y = uint(w[t - 13])
            s = (lo + y) & M
            hi += uint(w[t - 14]) + (((lo & y) | ((lo | y) & (s ^ M))) >> 31)
            lo = s
            y = uint(w[t - 31])
            s = (lo + y) & M
            hi += uint(w[t - 32]) + (((lo & y) | ((lo | y) & (s ^ M))) >> 31)
            w[t] = hi
            w[t + 1] = s
            t += 2
        ah = uint(h[0])
        al = uint(h[1])
        bh = uint(h[2])
        bl = uint(h[3])
        ch = uint(h[4])
        cl = uint(h[5])
        dh = uint(h[6])
        dl = uint(h[7])
        eh = uint(h[8])
        el = uint(h[9])
        fh = uint(h[10])
        fl = uint(h[11])
        gh = uint(h[12])
        gl = uint(h[13])
        hh = uint(h[14])
        hl = uint(h[15])
        t = 0
        while t < 160:
            # T1 = h + Sigma1(e) + Ch(e, f, g) + K[t] + W[t]
            hi = hh + (((eh >> 14) | (el << 18)) ^ ((eh >> 18) | (el << 14)) ^ ((el >> 9) | (eh << 23)))
            lo = hl
            y = (((el >> 14) | (eh << 18)) ^ ((el >> 18) | (eh << 14)) ^ ((eh >> 9) | (el << 23))) & M
            s = (lo + y) & M
            hi += ((lo & y) | ((lo | y) & (s ^ M))) >> 31
            lo = s
            y = gl ^ (el & (fl ^ gl))
            s = (lo + y) & M
            hi += (gh ^ (eh & (fh ^ gh))) + (((lo & y) | ((lo | y) & (s ^ M))) >> 31)
            lo = s
            y = uint(k[t + 1])
            s = (lo + y) & M
            hi += uint(k[t]) + (((lo & y) | ((lo | y) & (s ^ M))) >> 31)
            lo = s
            y = uint(w[t + 1])
            s = (lo + y) & M
            hi += uint(w[t]) + (((lo & y) | ((lo | y) & (s ^ M))) >> 31)
            # rotate the working variables; e = d + T1
            hh = gh
            hl = gl
            gh = fh
            gl = fl
            fh = eh
            fl = el
            y = dl
            el = (s + y) & M
            eh = (hi + dh + (((s & y) | ((s | y) & (el ^ M))) >> 31)) & M
            dh = ch
            dl = cl
            ch = bh
            cl = bl
            bh = ah
            bl = al
            # a = T1 + Sigma0(a) + Maj(a, b, c)   (b, c already shifted)
            hi += ((((bh >> 28) | (bl << 4)) ^ ((bl >> 2) | (bh << 30)) ^ ((bl >> 7) | (bh << 25)))
                   + ((bh & ch) | (dh & (bh | ch))))
            lo = s
            y = (((bl >> 28) | (bh << 4)) ^ ((bh >> 2) | (bl << 30)) ^ ((bh >> 7) | (bl << 25))) & M
            s = (lo + y) & M
            hi += ((lo & y) | ((lo | y) & (s ^ M))) >> 31
            lo = s
            y = (bl & cl) | (dl & (bl | cl))
            al = (lo + y) & M
            ah = (hi + (((lo & y) | ((lo | y) & (al ^ M))) >> 31)) & M
            t += 2
        w[0] = ah
        w[1] = al
        w[2] = bh
        w[3] = bl
        w[4] = ch
        w[5] = cl
        w[6] = dh
        w[7] = dl
        w[8] = eh
        w[9] = el
        w[10] = fh
        w[11] = fl
        w[12] = gh
        w[13] = gl
        w[14] = hh
        w[15] = hl
        t = 0
        while t < 16:
            lo = uint(h[t + 1])
            y = uint(w[t + 1])
            s = (lo + y) & M
            h[t] = uint(h[t]) + uint(w[t]) + (((lo & y) | ((lo | y) & (s ^ M))) >> 31)
            h[t + 1] = s
            t += 2
"""


# Plain-Python block function, same contract as the viper one. Python ints
# are unbounded, so sums are formed whole and the carry is taken from bit 32.
def _compress_py(H, w, k, b, nblk):
    M = 0xFFFFFFFF
    off = 0
    for _ in range(nblk):
        for t in range(32):
            j = off + (t << 2)
            w[t] = (b[j] << 24) | (b[j + 1] << 16) | (b[j + 2] << 8) | b[j + 3]
        off += 128
        for t in range(32, 160, 2):
            xh = w[t - 4]
            xl = w[t - 3]
            hi = ((xh >> 19) | (xl << 13)) ^ ((xl >> 29) | (xh << 3)) ^ (xh >> 6)
            lo = ((xl >> 19) | (xh << 13)) ^ ((xh >> 29) | (xl << 3)) ^ ((xl >> 6) | (xh << 26))
            xh = w[t - 30]
            xl = w[t - 29]
            hi += ((xh >> 1) | (xl << 31)) ^ ((xh >> 8) | (xl << 24)) ^ (xh >> 7)
            lo = (lo & M) + ((((xl >> 1) | (xh << 31)) ^ ((xl >> 8) | (xh << 24)) ^ ((xl >> 7) | (xh << 25))) & M)
            lo += w[t - 13] + w[t - 31]
            w[t] = (hi + w[t - 14] + w[t - 32] + (lo >> 32)) & M
            w[t + 1] = lo & M
        ah, al, bh, bl, ch, cl, dh, dl, eh, el, fh, fl, gh, gl, hh, hl = H
        for t in range(0, 160, 2):
            # T1 = h + Sigma1(e) + Ch(e, f, g) + K[t] + W[t]
            lo = (hl + ((((el >> 14) | (eh << 18)) ^ ((el >> 18) | (eh << 14)) ^ ((eh >> 9) | (el << 23))) & M)
                  + (gl ^ (el & (fl ^ gl))) + k[t + 1] + w[t + 1])
            hi = (hh + ((((eh >> 14) | (el << 18)) ^ ((eh >> 18) | (el << 14)) ^ ((el >> 9) | (eh << 23))) & M)
                  + (gh ^ (eh & (fh ^ gh))) + k[t] + w[t] + (lo >> 32))
            lo &= M
            hh = gh
            hl = gl
            gh = fh
            gl = fl
            fh = eh
            fl = el
            x = dl + lo
            el = x & M
            eh = (dh + hi + (x >> 32)) & M
            dh = ch
            dl = cl
            ch = bh
            cl = bl
            bh = ah
            bl = al
            # a = T1 + Sigma0(a) + Maj(a, b, c)
            lo += ((((bl >> 28) | (bh << 4)) ^ ((bh >> 2) | (bl << 30)) ^ ((bh >> 7) | (bl << 25))) & M) + (
                (bl & cl) | (dl & (bl | cl)))
            hi += ((((bh >> 28) | (bl << 4)) ^ ((bl >> 2) | (bh << 30)) ^ ((bl >> 7) | (bh << 25))) & M) + (
                (bh & ch) | (dh & (bh | ch))) + (lo >> 32)
            ah = hi & M
            al = lo & M
        v = (ah, al, bh, bl, ch, cl, dh, dl, eh, el, fh, fl, gh, gl, hh, hl)
        for i in range(0, 16, 2):
            lo = H[i + 1] + v[i + 1]
            H[i] = (H[i] + v[i] + (lo >> 32)) & M
            H[i + 1] = lo & M


# SHA-512("abc"), for the self-test in _select()
_ABC_HEX = (
    "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
    "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
)


def _select():
    # Prefer the native version; any failure (no native emitter, no
    # compiler, out of memory) leaves the plain one in place. So does a
    # wrong answer on one known block: a guard for ports whose viper code
    # generation was never tested here.
    try:
        import micropython

        g = {"micropython": micropython}
        exec(_VIPER_SRC, g)
        f = g["compress"]
        h = array("I", _IV)
        blk = bytearray(_BLOCK)
        blk[0:4] = b"abc\x80"
        blk[-1] = 24  # message length in bits
        f(h, _W, _K, blk, 1)
        if bytes(h) == bytes(_words(_ABC_HEX)):
            return f
    except Exception:
        pass
    return None


_compress_viper = _select()
# The block function in use; tests may swap in _compress_py to check it.
_compress = _compress_viper or _compress_py


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
