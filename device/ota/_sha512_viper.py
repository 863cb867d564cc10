# Native SHA-512 block function, used by ota/sha512.py (which holds the
# constants, the padding and a plain-Python version of the same function).
#
# A module of its own so that it can fail alone: on a port without the
# native emitter a .py with @micropython.viper does not compile
# (SyntaxError), and an .mpy with native code for another architecture
# does not load (ValueError "incompatible .mpy arch"). ota/sha512.py
# imports it inside try/except, checks it against one known block, and
# otherwise uses its plain version. Compiled by mpy-cross with -march
# (xtensawin on ESP32) it is machine code in the .mpy: nothing is compiled
# on the device at import.
#
# compress(H, W, K, buf, nblk): run nblk 128-byte blocks from buf (any
# buffer, starting at offset 0) into the 16-word state H (array('I'): each
# 64-bit word as hi, lo). W is a 160-word schedule buffer, K the 160-word
# round constants.
#
# Viper ints are machine words: 32 bits on ESP32, 64 bits on the unix
# port. So M masks to 32 bits wherever high garbage could matter (before
# right shifts and carry computations); ptr32 stores truncate by
# themselves. The carry out of lo + y (both < 2^32, s = (lo + y) & M) uses
# only logical operations, so it does not depend on signed/unsigned
# compares:
#   carry = ((lo & y) | ((lo | y) & ~s)) >> 31
# tests/test_sha512.py checks this function and the plain one against
# CPython's hashlib.

import micropython

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
