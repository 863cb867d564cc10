# SHA-512's block function in plain Python (ota/sha512.py loads it where the viper version,
# ota/_sha512_viper.py, cannot load). Same contract: compress(H, w, k, b, nblk) hashes nblk
# 128-byte blocks of b into the state H, 64-bit words kept as (hi, lo) 32-bit halves.
# Python ints
# are unbounded, so sums are formed whole and the carry is taken from bit 32.
def compress(H, w, k, b, nblk):
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
