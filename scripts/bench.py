#!/usr/bin/env python3
"""`make bench`: measured figures for the device agent, each next to a reference measured in
the same run, as ratios. Nothing here is asserted; tests check behaviour, this prints numbers.

  code size     agent .mpy per architecture        vs  the .py sources
  verify        ms per Ed25519 verify (device)     vs  a straightforward RFC 8032 transcription
  SHA-512       KiB/s of ota.sha512                vs  the built-in hashlib.sha256
  update        KiB/s of a full signed update      vs  a plain HTTP download into RAM (no flash, no hash)
  heap          smallest heap an update succeeds   vs  smallest heap for a boot that only confirms
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpota import devicepkg, dsse, espimage, keys, release  # noqa: E402
from mpota.server import serve_in_thread  # noqa: E402
from mpota.sim import device, runner  # noqa: E402

MICROPYTHON = runner.micropython_binary()


def row(name, value, unit, ref, ref_unit, ratio_text):
    print(f"  {name:<28} {value:>10} {unit:<10} reference {ref:>10} {ref_unit:<10} {ratio_text}")


def mp(script: str, path: list[Path], heap="512K") -> str:
    env = dict(os.environ, MICROPYPATH=":".join([".frozen"] + [str(p) for p in path]))
    r = subprocess.run([MICROPYTHON, "-X", f"heapsize={heap}", "-c", script], capture_output=True,
                       text=True, env=env)
    if r.returncode:
        raise SystemExit(f"bench: micropython failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def bench_code_size(tmp: Path):
    print("code size (device agent, mpy-cross)")
    src = sum(p.stat().st_size for p in devicepkg.agent_sources())
    boards = {}  # every board's architecture (x64 is the simulator's; later benches use it)
    for bj in sorted((ROOT / "boards").glob("*/board.json")):
        boards.setdefault(json.loads(bj.read_text())["mpy_arch"], []).append(bj.parent.name)
    for arch, names in sorted(boards.items()):
        files = devicepkg.install_agent(tmp / "mpy" / arch, arch=arch)
        n = sum(f.stat().st_size for f in files)
        row(f".mpy {arch}", n, "bytes", src, "bytes .py", f"{n / src:.2f}x of source ({', '.join(names)})")


# Runs in MicroPython: the smallest free heap (bytes, 256-byte steps) with which
# MOD.verify(pub, msg, sig) succeeds; the rest of the heap is taken by filler buffers.
_VERIFY_HEAP = runner.FILL_HEAP + """
from {mod} import verify
pub = bytes.fromhex('{pub}'); sig = bytes.fromhex('{sig}'); msg = bytes.fromhex('{msg}')
def ok(reserve):
    filler = fill_heap(reserve)
    try:
        return verify(pub, msg, sig) is True
    except MemoryError:
        return False
    finally:
        filler = None
        gc.collect()
lo, hi = 0, 1 << 16
while hi - lo > 256:
    mid = (lo + hi) // 2
    if ok(mid):
        hi = mid
    else:
        lo = mid
print(hi)
"""


def bench_crypto(tmp: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    lib = tmp / "mpy" / "x64"
    ref_dir = tmp / "ref"
    ref_dir.mkdir()
    # the RFC 8032 transcription lives here only, never on the device
    devicepkg.compile_file(ROOT / "scripts" / "bench_ref" / "ed25519_ref.py", ref_dir / "ed25519_ref.mpy", "x64")
    # 8 fixed keys, each signing its own manifest-sized message: the same figures every run, and
    # no single key's scalars (the main loop is 125 to 134 steps long) decide the result
    sigs = []
    for i in range(8):
        k = Ed25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32)
        msg = dsse.pae(dsse.PAYLOAD_TYPE, bytes([0x61 + i]) * 600)
        sigs.append((keys.raw_public(k.public_key()), msg, k.sign(msg)))
    pub, msg, sig = sigs[0]
    n = 10  # verifies of each signature per round
    # Rounds alternate between the device verifier and the reference, so a slow spell of the
    # machine hits both; each figure is the best round (noise only ever adds).
    script = f"""
import gc, time
gc.collect(); a = gc.mem_alloc(); t = time.ticks_us()
from ota.ed25519 import verify
imp_us = time.ticks_diff(time.ticks_us(), t); gc.collect(); imp_mem = gc.mem_alloc() - a
import ed25519_ref
sigs = [tuple(bytes.fromhex(x) for x in s) for s in {[tuple(x.hex() for x in s) for s in sigs]!r}]
pub, msg, sig = sigs[0]
t = time.ticks_us()
assert verify(pub, msg, sig) is True
first = time.ticks_diff(time.ticks_us(), t)
for s in sigs:
    assert verify(*s) is True and ed25519_ref.verify(*s)
def per_call(f, n):
    t = time.ticks_us()
    for s in sigs:
        for i in range(n):
            f(*s)
    return time.ticks_diff(time.ticks_us(), t) / (n * len(sigs))
dev = ref = None
for _ in range(5):
    us = per_call(verify, {n})
    dev = us if dev is None else min(dev, us)
    us = per_call(ed25519_ref.verify, 1)
    ref = us if ref is None else min(ref, us)
from ota import sha512 as m
import hashlib
buf = bytes(64 * 1024)
def hash_us(f, data):
    best = None
    for _ in range(3):
        t = time.ticks_us(); f(data).digest(); us = time.ticks_diff(time.ticks_us(), t)
        best = us if best is None else min(best, us)
    return best
s512 = hash_us(m.sha512, buf)
s256 = hash_us(hashlib.sha256, buf)
m._compress = m._plain()
s512py = hash_us(m.sha512, buf[:8192]) * 8
print(dev, ref, first, imp_us, imp_mem, s512, s256, s512py, m._compress_viper is not None)
"""
    out = mp(script, [lib, ref_dir]).split()
    dev, ref, first, imp_us, imp_mem, s512, s256, s512py = map(float, out[:8])
    native = out[8] == "True"
    args = dict(pub=pub.hex(), sig=sig.hex(), msg=msg.hex())
    need = int(mp(_VERIFY_HEAP.format(mod="ota.ed25519", **args), [lib], heap="256K"))
    need_ref = int(mp(_VERIFY_HEAP.format(mod="ed25519_ref", **args), [lib, ref_dir], heap="256K"))
    print(f"crypto (unix port, .mpy; Ed25519 over {len(msg)}-byte messages, {len(sigs)} keys)")
    row("Ed25519 verify", f"{dev / 1000:.2f}", "ms", f"{ref / 1000:.2f}", "ms (RFC)", f"{ref / dev:.1f}x faster")
    # issue 3's target, 2 ms where the same RFC transcription took 9.6 ms, scaled to this machine
    row("  target (issue 3)", f"{ref / 4.8 / 1000:.2f}", "ms", f"{ref / 1000:.2f}", "ms (RFC)",
        f"4.8x faster; {'met' if ref / dev >= 4.8 else 'NOT met'} ({dev * 4.8 / ref * 2:.2f} ms at 9.6 ms RFC)")
    row("  first verify", f"{first / 1000:.2f}", "ms", f"{dev / 1000:.2f}", "ms later",
        f"{first / dev:.2f}x (a cold heap; no table is built)")
    row("  free heap one verify needs", f"{need / 1024:.1f}", "KiB", f"{need_ref / 1024:.1f}", "KiB (RFC)",
        f"{need / need_ref:.2f}x")
    row("ota.ed25519 import", f"{imp_us / 1000:.2f}", "ms", f"{imp_mem / 1024:.1f}", "KiB heap",
        "(with ota.sha512; 6 KiB of it the shipped tables)")
    kib = 64
    row("SHA-512 (viper)" if native else "SHA-512 (plain, no viper)", f"{kib / (s512 / 1e6):.0f}", "KiB/s",
        f"{kib / (s256 / 1e6):.0f}", "KiB/s C sha256", f"{s512 / s256:.0f}x slower")
    row("SHA-512 (plain fallback)", f"{kib / (s512py / 1e6):.0f}", "KiB/s", f"{kib / (s512 / 1e6):.0f}",
        "KiB/s viper", f"{s512py / s512:.0f}x slower")


def _device_with_release(tmp: Path, size: int, heap: str, main_py: str | None = None):
    kp = tmp / "keys" / "k"
    if not kp.exists():
        keys.generate(kp)
    fw1 = tmp / "fw1.bin"
    fw1.write_bytes(espimage.build_sim_firmware("1.0.0", size=64 * 1024))
    fw2 = tmp / f"fw2-{size}.bin"
    if not fw2.exists():
        fw2.write_bytes(espimage.build_sim_firmware("2.0.0", size=size))
    rel = tmp / f"rel-{size}"
    if not rel.exists():
        release.build(fw2, rel, [keys.load_private(kp)])
    return kp, fw1, fw2, rel


def _update_once(tmp, server_url, kp, fw1, heap, main_py=None):
    dev = device.create("b", [kp.with_name("k.pub")], server_url, fw1, root=tmp / "devices", force=True, heap=heap)
    if main_py:
        (dev.fs / "main.py").write_text(main_py)
    t = time.monotonic()
    try:
        runner.run(dev, echo=lambda line: None, max_boots=4)
    except runner.SimError:
        return False, 0.0
    # the outcome is read with a roomy heap: the measured boot is the one above, not this query
    return runner.status(dev, heap="256K")["version"] == "2.0.0" or main_py is not None, time.monotonic() - t


def bench_update(tmp: Path):
    size = 1024 * 1024
    kp, fw1, fw2, rel = _device_with_release(tmp, size, "128K")
    httpd, url = serve_in_thread(rel)
    try:
        dev = device.create("b", [kp.with_name("k.pub")], url, fw1, root=tmp / "devices", force=True)
        (dev.fs / "main.py").write_text("import ota\nota.update()\n")
        t = time.monotonic()
        runner.run(dev, echo=lambda line: None, max_boots=2)
        dt_update = time.monotonic() - t
        # reference: the same bytes downloaded by the same micropython into one buffer
        script = f"""
import requests, time
t = time.ticks_us()
r = requests.get('{url}{fw2.name}')
buf = memoryview(bytearray(4096)); n = 0
while True:
    k = r.raw.readinto(buf)
    if not k: break
    n += k
print(time.ticks_diff(time.ticks_us(), t), n)
"""
        ref_us, n = map(int, mp(script, []).split())
        kib = size / 1024
        print("update (1 MiB image, simulated flash, .mpy, 128K heap; includes process start and reboot)")
        row("signed update", f"{kib / dt_update:.0f}", "KiB/s", f"{kib / (ref_us / 1e6):.0f}", "KiB/s plain GET",
            f"{(ref_us / 1e6) / dt_update:.2f}x of plain download speed")

        def smallest(main_py=None):
            lo, hi = 32, 256  # KiB
            while hi - lo > 1:  # to 1 KiB
                mid = (lo + hi) // 2
                ok, _ = _update_once(tmp, url, kp, fw1, f"{mid}K", main_py)
                lo, hi = (lo, mid) if ok else (mid, hi)
            return hi
        need = smallest()
        base = smallest("import ota\nota.confirm(lambda: True)\n")
        print("heap (unix port; the emulated esp32 module (~12 KiB) is included)")
        row("smallest heap for an update", need, "KiB", base, "KiB confirm", f"{need / base:.2f}x")
    finally:
        httpd.shutdown()


def main():
    tmp = Path(tempfile.mkdtemp(prefix="mpota-bench-"))
    try:
        bench_code_size(tmp)
        bench_crypto(tmp)
        bench_update(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
