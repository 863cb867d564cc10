# device/ota/sha512.py against CPython's hashlib, run in the real MicroPython
# unix binary. Cases are generated here, written to one JSON file, and checked
# by a single micropython process per batch.
import ast
import hashlib
import json
import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from conftest import run_micropython, tool

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / "device"
SHA_SRC = DEVICE / "ota" / "sha512.py"




# Runs in MicroPython. argv: cases.json. Each case: data (hex, repeated rep
# times if rep is given), chunks
# (list of sizes), mode ("viper" or "py"), kind ("bytes", "bytearray",
# "memoryview"), at (chunk index after which digest() is taken mid-stream, or
# -1). Prints one JSON line per case: [mid digest or null, final digest,
# second final digest, hexdigest, digest of a copy made mid-stream].
_RUNNER = r"""
import sys, json
from binascii import hexlify, unhexlify
from ota import sha512 as m

if m._compress_viper is None:
    print("NO-VIPER")
mode = None
with open(sys.argv[1]) as f:
    cases = json.load(f)
for c in cases:
    if c["mode"] != mode:
        mode = c["mode"]
        m._compress = m._compress_viper if mode == "viper" else m._plain()
    data = unhexlify(c["data"]) * c.get("rep", 1)
    if c["kind"] == "bytearray":
        data = bytearray(data)
    elif c["kind"] == "memoryview":
        data = memoryview(bytearray(b"\xaa" + data + b"\xbb"))[1:-1]
    if c["chunks"] is None:
        h = m.sha512(data)
        mid = None
        cp = h.copy()
    else:
        h = m.sha512()
        mid = None
        cp = None
        pos = 0
        for i, n in enumerate(c["chunks"]):
            h.update(data[pos:pos + n])
            pos += n
            if i == c["at"]:
                mid = hexlify(h.digest()).decode()
                cp = h.copy()
        h.update(data[pos:])
        if cp is None:
            cp = h.copy()
    d1 = hexlify(h.digest()).decode()
    d2 = hexlify(h.digest()).decode()
    print(json.dumps([mid, d1, d2, h.hexdigest(), hexlify(cp.digest()).decode()]))
"""


def _run(cases, tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    out = run_micropython(_RUNNER, path, path=DEVICE, tmp_path=tmp_path, heap="64M")
    lines = out.splitlines()
    assert "NO-VIPER" not in lines, "viper version did not compile on the unix port"
    assert len(lines) == len(cases), out[-2000:]
    return [json.loads(x) for x in lines]


def _expected(c):
    data = bytes.fromhex(c["data"]) * c.get("rep", 1)
    full = hashlib.sha512(data).hexdigest()
    mid = None
    if c["chunks"] is not None and 0 <= c["at"] < len(c["chunks"]):
        mid = hashlib.sha512(data[:sum(c["chunks"][:c["at"] + 1])]).hexdigest()
    return full, mid


def _check(cases, results):
    bad = []
    for c, (mid, d1, d2, hx, dcopy) in zip(cases, results):
        full, emid = _expected(c)
        ok = d1 == full and d2 == full and hx == full and mid == emid
        # the copy made mid-stream (or at the end) never saw the later data
        ok = ok and dcopy == (emid if emid is not None else full)
        if not ok:
            bad.append((c["mode"], c["kind"], len(c["data"]) // 2 * c.get("rep", 1), c["chunks"], c["at"]))
    assert not bad, "%d mismatches, first: %r" % (len(bad), bad[:5])


def _case(data, chunks=None, at=-1, mode="viper", kind="bytes"):
    return {"data": data.hex(), "chunks": chunks, "at": at, "mode": mode, "kind": kind}


@pytest.mark.parametrize("mode", ["viper", "py"])
def test_all_lengths_0_to_1000(tmp_path, mode):
    rng = random.Random(512)
    kinds = ["bytes", "bytearray", "memoryview"]
    cases = [_case(rng.randbytes(n), mode=mode, kind=kinds[n % 3]) for n in range(1001)]
    _check(cases, _run(cases, tmp_path))


def test_known_answers(tmp_path):
    # FIPS 180-4 examples, plus one million 'a' (fed in uneven pieces)
    cases = [
        _case(b"abc"),
        _case(b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopq"
              b"klmnopqrlmnopqrsmnopqrstnopqrstu"),
        dict(_case(b"a", chunks=[1, 127, 128, 129, 65536, 3], at=2), rep=1000000),
        dict(_case(b"a", chunks=[1, 127, 128, 129, 65536, 3], at=3, mode="py"), rep=100000),
    ]
    results = _run(cases, tmp_path)
    assert results[0][1] == ("ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
                             "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f")
    assert results[1][1] == ("8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018"
                             "501d289e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909")
    assert results[2][1] == ("e718483d0ce769644e2e42c7bc15b4638e1f98b13b2044285632a803afa973eb"
                             "de0ff244877ea60a4cb0432ce577c31beb009c5c2c49aa2e4eadb217ad8cc09b")
    _check(cases, results)


def test_hypothesis_random_chunkings(tmp_path):
    # Hypothesis generates the cases; one micropython run checks them all.
    cases = []

    @settings(max_examples=400, deadline=None, database=None)
    @given(st.data())
    def collect(draw):
        data = draw.draw(st.one_of(st.binary(max_size=300), st.binary(min_size=300, max_size=3000)))
        cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=12)))
        chunks = [b - a for a, b in zip([0] + cuts, cuts)]
        at = draw.draw(st.integers(-1, max(len(chunks) - 1, -1)))
        mode = draw.draw(st.sampled_from(["viper", "py"]))
        kind = draw.draw(st.sampled_from(["bytes", "bytearray", "memoryview"]))
        cases.append(_case(data, chunks, at, mode, kind))

    collect()
    cases.sort(key=lambda c: c["mode"])
    assert len(cases) >= 300
    _check(cases, _run(cases, tmp_path))


# Runs in MicroPython with a copy of the package whose _sha512_viper is one
# of the variants below; prints what sha512 selected and one digest.
_SELECT_SCRIPT = r"""
from ota import sha512 as m
print(m._compress_viper is not None, m._compress is m._compress_viper,
      m._compress is m._plain(), m.sha512(b"abc" * 100).hexdigest())
"""

VIPER_SRC = DEVICE / "ota" / "_sha512_viper.py"


def _mpy(src, dest, arch):
    r = subprocess.run([tool("mpy-cross"), "-march=" + arch, "-o", str(dest), str(src)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _package_with(tmp_path, variant):
    # ota/ as .mpy files (as on a device), except _sha512_viper per variant
    pkg = tmp_path / variant / "ota"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    _mpy(SHA_SRC, pkg / "sha512.mpy", "x64")
    _mpy(DEVICE / "ota" / "_sha512_py.py", pkg / "_sha512_py.mpy", "x64")
    viper = VIPER_SRC.read_text()
    if variant == "mpy-x64":
        _mpy(VIPER_SRC, pkg / "_sha512_viper.mpy", "x64")
    elif variant == "mpy-xtensawin":  # ValueError: incompatible .mpy arch
        _mpy(VIPER_SRC, pkg / "_sha512_viper.mpy", "xtensawin")
    elif variant == "no-native-emitter":  # SyntaxError at compile time
        assert "@micropython.viper" in viper
        (pkg / "_sha512_viper.py").write_text(viper.replace("@micropython.viper",
                                                            "@micropython.no_such_emitter"))
    elif variant == "wrong-answer":  # loads, computes, fails the self-test
        bad = viper.replace("h[t + 1] = s", "h[t + 1] = s ^ 1")
        assert bad != viper
        (pkg / "_sha512_viper.py").write_text(bad)
    elif variant == "memory-error":
        (pkg / "_sha512_viper.py").write_text("raise MemoryError\n")
    else:
        assert variant == "missing"
    return pkg.parent


@pytest.mark.parametrize("variant", ["mpy-x64", "mpy-xtensawin", "no-native-emitter", "wrong-answer",
                                     "memory-error", "missing"])
def test_viper_module_selection(tmp_path, variant):
    # The native block function comes from its own module, compiled ahead of
    # time; whenever it cannot load or gives a wrong answer the plain version
    # is used, and the digest is right either way.
    path = _package_with(tmp_path, variant)
    viper, uses_viper, uses_py, digest = run_micropython(_SELECT_SCRIPT, path=path, tmp_path=tmp_path,
                                                         timeout=60).split()
    assert digest == hashlib.sha512(b"abc" * 100).hexdigest()
    if variant == "mpy-x64":
        assert (viper, uses_viper, uses_py) == ("True", "True", "False")
    else:
        assert (viper, uses_viper, uses_py) == ("False", "False", "True")


def test_no_source_compiled_at_import():
    # The old design compiled the viper code from a string with exec() at
    # import; now the device only loads ahead-of-time compiled code.
    tree = ast.parse(SHA_SRC.read_text())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"exec", "eval", "compile"}
    decorated = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.decorator_list]
    assert decorated == []
    viper = ast.parse(VIPER_SRC.read_text())
    assert [ast.unparse(d) for n in viper.body if isinstance(n, ast.FunctionDef)
            for d in n.decorator_list] == ["micropython.viper"]


@pytest.mark.parametrize("arch", ["x64", "xtensawin"])
def test_mpy_cross_compiles(tmp_path, arch):
    # Both modules, as native code for ESP32 (xtensawin) and the unix port (x64).
    for src in (SHA_SRC, VIPER_SRC):
        out = tmp_path / (src.stem + "." + arch + ".mpy")
        _mpy(src, out, arch)
        assert out.stat().st_size > 0
