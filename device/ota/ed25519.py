# Ed25519 signature verification (RFC 8032, section 5.1.7) in pure
# MicroPython.
#
#   verify(public_key, message, signature) -> True / False
#
# Strict and cofactorless: the signature (R, S) is accepted only if
#   * public_key and signature are 32 and 64 bytes (bytes, bytearray or
#     memoryview); message is bytes, bytearray or memoryview,
#   * S < L,
#   * A (the public key) is a canonical point encoding: y < p, on the
#     curve, and not x = 0 with the sign bit set,
#   * encode([S]B - [k]A) == R byte for byte, k = SHA-512(R || A || M) mod L.
# The last check also rejects every non-canonical or off-curve R, because
# an encoding computed here is always canonical.
# Anything else, including wrong argument types, gives False. The one
# exception that passes through is MemoryError: running out of heap says
# nothing about the signature, and the caller must not report it as a bad
# one (the agent records `no-memory`).
#
# Field elements are Python ints mod p = 2^255 - 19 (MicroPython's long
# ints); points use extended twisted Edwards coordinates (X:Y:Z:T),
# x = X/Z, y = Y/Z, x*y = T/Z, with a = -1 (Hisil-Wong-Carter-Dawson
# 2008 formulas). [S]B - [k]A is one interleaved double-and-add pass
# (Straus/Shamir) over width-w NAF digits of both scalars, sharing the
# doublings. B's multiples are computed once, on the first verify, not at
# import; A's are computed per call.

try:
    from .sha512 import sha512 as _sha512
except ImportError:
    from sha512 import sha512 as _sha512

from array import array
from micropython import const

# _P = 2^255 - 19
_P = const(57896044618658097711785492504343953926634992332820282019728792003956564819949)
# _L = 2^252 + 27742317777372353535851937790883648493
_L = const(7237005577332262213973186563042994240857116359379907606001950938285454250989)
_D = const(37095705934669439343138083508754565189542113879843219016388785533085940283555)
_D2 = const(16295367250680780974490674513165176452449235426866156013048779062215315747161)
_SQRTM1 = const(19681161376707505956807079304988542015446066515923890162744021073123829784752)
_BX = const(15112221349535400772501151409588531511454012693041857206046113283949847762202)
_BY = const(46316835694926478169428394003475163141307993866256225615783033603165251855960)

# wNAF widths: digits are odd, |digit| < 2^(w-1); a table holds the
# 2^(w-2) odd multiples 1P, 3P, 5P, ...
_WA = const(5)  # 8 multiples of A, rebuilt each call
_WB = const(6)  # 16 multiples of B, built once (w = 7 is no faster)

_btab = None  # B multiples as affine (y - x, y + x, 2*d*x*y), flattened


def _sq(x, n):
    # x^(2^n) mod p
    p = _P
    for _ in range(n):
        x = x * x % p
    return x


def _chain(z):
    # z^(2^250 - 1) and z^11, the common part of the addition chains for
    # z^(p-2) and z^((p-5)/8) (as in ref10's fe_invert / fe_pow22523).
    # About 265 modular multiplications; pow(z, e, p) needs about twice that.
    p = _P
    z2 = z * z % p
    t = _sq(z2, 2)
    z9 = t * z % p
    z11 = z9 * z2 % p
    t = z11 * z11 % p * z9 % p  # 2^5 - 1
    t5 = t
    t = _sq(t, 5) * t5 % p  # 2^10 - 1
    t10 = t
    t = _sq(t, 10) * t10 % p  # 2^20 - 1
    t = _sq(t, 20) * t % p  # 2^40 - 1
    t = _sq(t, 10) * t10 % p  # 2^50 - 1
    t50 = t
    t = _sq(t, 50) * t50 % p  # 2^100 - 1
    t = _sq(t, 100) * t % p  # 2^200 - 1
    t = _sq(t, 50) * t50 % p  # 2^250 - 1
    return t, z11


def _inv(z):
    # z^(p-2) = z^(2^255 - 21) = 1/z mod p
    t, z11 = _chain(z % _P)
    return _sq(t, 5) * z11 % _P


def _naf(s, w):
    # Width-w NAF of the 32-byte little-endian scalar s (< 2^253) as an
    # array of 256 signed digits, least significant first.
    naf = array("b", bytes(256))
    b = bytes(s) + b"\x00\x00"
    width = 1 << w
    half = width >> 1
    mask = width - 1
    pos = 0
    carry = 0
    while pos < 256:
        i = pos >> 3
        win = carry + (((b[i] | (b[i + 1] << 8)) >> (pos & 7)) & mask)
        if not win & 1:
            pos += 1
            continue
        if win < half:
            carry = 0
            naf[pos] = win
        else:
            carry = 1
            naf[pos] = win - width
        pos += w
    return naf


def _odd_multiples(x, y, n):
    # Affine (x, y) -> P, 3P, ..., (2n-1)P in extended coordinates, as a
    # flat list X, Y, Z, T, X, Y, Z, T, ... (fully reduced).
    p = _P
    t = x * y % p
    # 2P (dbl-2008-hwcd with Z1 = 1), as a cached addend (see _verify)
    a = x * x % p
    b = y * y % p
    e = 2 * t
    g = b - a
    f = 2 - g
    h = a + b
    dx = e * f % p
    dy = g * h % p
    dz = f * g % p
    dt = e * h % p
    qm = (dy - dx) % p
    qp = (dy + dx) % p
    qt = dt * _D2 % p
    qz = 2 * dz % p
    out = [x, y, 1, t]
    X = x
    Y = y
    Z = 1
    T = t
    for _ in range(n - 1):
        a = (Y - X) * qm % p
        b = (Y + X) * qp % p
        c = T * qt % p
        d = Z * qz % p
        e = b - a
        f = d - c
        g = d + c
        h = b + a
        X = e * f % p
        Y = g * h % p
        Z = f * g % p
        T = e * h % p
        out.append(X)
        out.append(Y)
        out.append(Z)
        out.append(T)
    return out


def _base_table():
    # B, 3B, ..., as affine cached addends (y - x, y + x, 2*d*x*y), built
    # on first use and kept (16 entries: 48 ints, about 2.5 KB on ESP32).
    global _btab
    if _btab is None:
        p = _P
        n = 1 << (_WB - 2)
        pts = _odd_multiples(_BX, _BY, n)
        # batch inversion of the Z's: one inversion for all
        acc = [1] * (n + 1)
        for i in range(n):
            acc[i + 1] = acc[i] * pts[4 * i + 2] % p
        inv = _inv(acc[n])
        tab = [0] * (3 * n)
        for i in range(n - 1, -1, -1):
            zi = inv * acc[i] % p
            inv = inv * pts[4 * i + 2] % p
            x = pts[4 * i] * zi % p
            y = pts[4 * i + 1] * zi % p
            tab[3 * i] = (y - x) % p
            tab[3 * i + 1] = (y + x) % p
            tab[3 * i + 2] = x * y % p * _D2 % p
        _btab = tab
    return _btab


def _decode_point(s):
    # 32 bytes -> affine (x, y), or None unless a canonical curve point
    # (RFC 8032 5.1.3).
    p = _P
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= p:
        return None
    yy = y * y % p
    u = (yy - 1) % p
    v = (_D * yy + 1) % p
    # x = u v^3 (u v^7)^((p-5)/8) is a square root of u/v if one exists
    v3 = v * v % p * v % p
    uv3 = u * v3 % p
    w = uv3 * v3 % p * v % p
    t, _ = _chain(w)
    x = uv3 * (_sq(t, 2) * w % p) % p  # w^(2^252 - 3) = w^((p-5)/8)
    vxx = v * x % p * x % p
    if vxx != u:
        if vxx != p - u:
            return None
        x = x * _SQRTM1 % p
    if x == 0 and sign:
        return None
    if (x & 1) != sign:
        x = p - x
    return x, y


def _is_buf(v):
    return isinstance(v, (bytes, bytearray, memoryview))


def verify(public_key, message, signature):
    try:
        return _verify(public_key, message, signature)
    except MemoryError:
        raise
    except Exception:  # any other failure on hostile input is a rejection
        return False


def _verify(public_key, message, signature):
    if not (_is_buf(public_key) and _is_buf(message) and _is_buf(signature)):
        return False
    pk = bytes(public_key)
    sig = bytes(signature)
    if len(pk) != 32 or len(sig) != 64:
        return False
    p = _P
    rb = sig[:32]
    # R's y: an encoding with y >= p can never equal a computed one
    ry = int.from_bytes(rb, "little") & ((1 << 255) - 1)
    if ry >= p:
        return False
    if int.from_bytes(sig[32:], "little") >= _L:
        return False
    pt = _decode_point(pk)
    if pt is None:
        return False
    h = _sha512(rb)
    h.update(pk)
    h.update(message)
    k = int.from_bytes(h.digest(), "little") % _L

    # [S]B - [k]A = [S]B + [k](-A): negate A (x -> -x) for its table.
    ta = _odd_multiples(p - pt[0], pt[1], 1 << (_WA - 2))
    # cached addends: (Y - X, Y + X, 2*d*T, 2*Z)
    for j in range(0, len(ta), 4):
        X = ta[j]
        Y = ta[j + 1]
        Z = ta[j + 2]
        ta[j] = (Y - X) % p
        ta[j + 1] = (Y + X) % p
        ta[j + 2] = ta[j + 3] * _D2 % p
        ta[j + 3] = 2 * Z % p
    tb = _base_table()
    na = _naf(k.to_bytes(32, "little"), _WA)
    nb = _naf(sig[32:], _WB)

    # Main loop. Products are reduced lazily with the fold
    #   v = (v & M) + (v >> 255) * 19     (2^255 = 19 mod p)
    # which keeps v's residue mod p and is cheaper than v % p. Products
    # that only feed sums get one fold (result below 2^263); products that
    # become coordinates get two (below 2^256 in absolute value, possibly
    # slightly negative). Correctness does not depend on these bounds,
    # only the sizes of the numbers do: the result is reduced fully at
    # the end.
    M = (1 << 255) - 1
    i = 255
    while i >= 0 and not na[i] and not nb[i]:
        i -= 1
    # accumulator starts at the neutral element (0 : 1 : 1 : 0)
    X = 0
    Y = 1
    Z = 1
    T = 0
    while i >= 0:
        da = na[i]
        db = nb[i]
        # doubling (dbl-2008-hwcd, a = -1; result scaled by -1, which
        # leaves the point unchanged). T only when an addition follows.
        a = X * X
        a = (a & M) + (a >> 255) * 19
        b = Y * Y
        b = (b & M) + (b >> 255) * 19
        c = Z * Z
        c = ((c & M) + (c >> 255) * 19) << 1
        e = X * Y
        e = ((e & M) + (e >> 255) * 19) << 1
        g = b - a
        f = c - g
        h = a + b
        X = e * f
        X = (X & M) + (X >> 255) * 19
        X = (X & M) + (X >> 255) * 19
        Y = g * h
        Y = (Y & M) + (Y >> 255) * 19
        Y = (Y & M) + (Y >> 255) * 19
        Z = f * g
        Z = (Z & M) + (Z >> 255) * 19
        Z = (Z & M) + (Z >> 255) * 19
        if da or db:
            T = e * h
            T = (T & M) + (T >> 255) * 19
            T = (T & M) + (T >> 255) * 19
        # add +-(odd multiple of -A) (add-2008-hwcd-3, a = -1, k = 2d);
        # negating a cached addend swaps Y-X with Y+X and negates 2dT
        if da:
            if da > 0:
                j = (da >> 1) << 2
                a = (Y - X) * ta[j]
                b = (Y + X) * ta[j + 1]
            else:
                j = (-da >> 1) << 2
                a = (Y - X) * ta[j + 1]
                b = (Y + X) * ta[j]
            a = (a & M) + (a >> 255) * 19
            b = (b & M) + (b >> 255) * 19
            c = T * ta[j + 2]
            c = (c & M) + (c >> 255) * 19
            if da < 0:
                c = -c
            d = Z * ta[j + 3]
            d = (d & M) + (d >> 255) * 19
            e = b - a
            f = d - c
            g = d + c
            h = b + a
            X = e * f
            X = (X & M) + (X >> 255) * 19
            X = (X & M) + (X >> 255) * 19
            Y = g * h
            Y = (Y & M) + (Y >> 255) * 19
            Y = (Y & M) + (Y >> 255) * 19
            Z = f * g
            Z = (Z & M) + (Z >> 255) * 19
            Z = (Z & M) + (Z >> 255) * 19
            if db:
                T = e * h
                T = (T & M) + (T >> 255) * 19
                T = (T & M) + (T >> 255) * 19
        # add +-(odd multiple of B); affine addend, so 2*Z1*Z2 = 2*Z1
        if db:
            if db > 0:
                j = (db >> 1) * 3
                a = (Y - X) * tb[j]
                b = (Y + X) * tb[j + 1]
            else:
                j = (-db >> 1) * 3
                a = (Y - X) * tb[j + 1]
                b = (Y + X) * tb[j]
            a = (a & M) + (a >> 255) * 19
            b = (b & M) + (b >> 255) * 19
            c = T * tb[j + 2]
            c = (c & M) + (c >> 255) * 19
            if db < 0:
                c = -c
            d = Z + Z
            e = b - a
            f = d - c
            g = d + c
            h = b + a
            X = e * f
            X = (X & M) + (X >> 255) * 19
            X = (X & M) + (X >> 255) * 19
            Y = g * h
            Y = (Y & M) + (Y >> 255) * 19
            Y = (Y & M) + (Y >> 255) * 19
            Z = f * g
            Z = (Z & M) + (Z >> 255) * 19
            Z = (Z & M) + (Z >> 255) * 19
        i -= 1

    # encode and compare with R; y first (no inversion needed to reject)
    if (Y - ry * Z) % p:
        return False
    zi = _inv(Z)
    x = X * zi % p
    y = Y * zi % p
    return (y | ((x & 1) << 255)) == int.from_bytes(rb, "little")
