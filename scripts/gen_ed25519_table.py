#!/usr/bin/env python3
"""Generate the precomputed base-point tables of device/ota/ed25519.py (run by hand).

The device verifier ships two tables of odd multiples of points of the Ed25519 group, as
bytes literals, so that nothing is computed at import or on the first verify:

  _TB0: B,         3B,         5B, ...,        (2n-1)B          n = 2^(w-2) entries
  _TB1: B' = [2^128]B, 3B', ...,               (2n-1)B'

Each entry is the point in affine "cached" form, three field elements of 32 bytes each
(little-endian, fully reduced mod p):  y - x,  y + x,  2*d*x*y.

  python scripts/gen_ed25519_table.py           # print the literals
  python scripts/gen_ed25519_table.py --write   # replace them in device/ota/ed25519.py
  python scripts/gen_ed25519_table.py --check   # exit 1 if the shipped tables differ

tests/test_ed25519.py imports tables() and compares it with the shipped bytes.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ED_SRC = ROOT / "device" / "ota" / "ed25519.py"

P = 2**255 - 19
D = -121665 * pow(121666, P - 2, P) % P
W = 5            # wNAF width of the base scalars on the device (_WB there)
SPLIT = 128      # the second table is for [2^SPLIT]B (_SPLIT there)
BEGIN = "# --- begin generated tables (scripts/gen_ed25519_table.py) ---"
END = "# --- end generated tables ---"


def _add(p1, p2):
    # affine Edwards addition, a = -1 (complete for Ed25519)
    x1, y1 = p1
    x2, y2 = p2
    t = D * x1 * x2 * y1 * y2 % P
    x3 = (x1 * y2 + x2 * y1) * pow(1 + t, P - 2, P) % P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P
    return x3, y3


def _mul(k, pt):
    r = (0, 1)
    while k:
        if k & 1:
            r = _add(r, pt)
        pt = _add(pt, pt)
        k >>= 1
    return r


def base_point():
    y = 4 * pow(5, P - 2, P) % P
    xx = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    x = pow(xx, (P + 3) // 8, P)
    if (x * x - xx) % P:
        x = x * pow(2, (P - 1) // 4, P) % P
    if x & 1:
        x = P - x
    return x, y


def _odd_multiples(pt, n):
    two = _add(pt, pt)
    out = [pt]
    for _ in range(n - 1):
        out.append(_add(out[-1], two))
    return out


def _encode(points):
    out = bytearray()
    for x, y in points:
        for v in ((y - x) % P, (y + x) % P, 2 * D * x * y % P):
            out += v.to_bytes(32, "little")
    return bytes(out)


def tables(w=W, split=SPLIT):
    """(_TB0, _TB1) as bytes."""
    b = base_point()
    n = 1 << (w - 2)
    return _encode(_odd_multiples(b, n)), _encode(_odd_multiples(_mul(1 << split, b), n))


def _literal(name, data, per_line=16):
    lines = [f"{name} = ("]
    for i in range(0, len(data), per_line):
        lines.append('    b"' + "".join(f"\\x{c:02x}" for c in data[i:i + per_line]) + '"')
    lines.append(")")
    return "\n".join(lines)


def source():
    tb0, tb1 = tables()
    return "\n".join([BEGIN, _literal("_TB0", tb0), _literal("_TB1", tb1), END])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite the tables in device/ota/ed25519.py")
    g.add_argument("--check", action="store_true", help="exit 1 if device/ota/ed25519.py differs")
    a = ap.parse_args(argv)
    text = source()
    if not (a.write or a.check):
        print(text)
        return 0
    src = ED_SRC.read_text()
    pat = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pat.search(src):
        print(f"markers not found in {ED_SRC}", file=sys.stderr)
        return 1
    new = pat.sub(lambda m: text, src)
    if a.check:
        ok = new == src
        print("tables up to date" if ok else "tables differ: run with --write")
        return 0 if ok else 1
    ED_SRC.write_text(new)
    print(f"wrote {len(tables()[0]) * 2} table bytes to {ED_SRC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
