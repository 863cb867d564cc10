"""`mpota push`: a signed release over the board's serial link, into the same verified pipeline
as over HTTP. The board here is the simulator's (`mpota sim repl`), reached as socket:// like
QEMU's serial port; tests/test_target.py runs the same against a real board or QEMU."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import SimRepl, tool
from mpota import push as pushmod


@pytest.fixture
def board(server, firmware, make_device):
    """A simulated board on 1.0.0 whose configured server is unreachable: only a push updates it."""
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/")
    d.config(watchdog_ms=3000)
    r = SimRepl(d.dev.name, d.dev.path.parent)
    yield d, r
    r.stop()


def mpota(*args, timeout=120):
    return subprocess.run([tool("mpota"), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def mpremote_status(url):
    r = subprocess.run([tool("mpremote"), "connect", url, "resume", "exec",
                        "import ota, json; print('STATUS ' + json.dumps(ota.status()))"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.split("STATUS ", 1)[1])


def wait_for(url, pred, tries=40):
    import time
    st = None
    for _ in range(tries):
        st = mpremote_status(url)
        if pred(st):
            return st
        time.sleep(0.5)
    raise AssertionError(f"the board never got there: {st}")


def test_push_installs_and_the_board_confirms_after_its_reset(board, firmware, signer, tmp_path):
    d, repl = board
    from mpota import release
    release.build(firmware("2.0.0"), tmp_path / "rel", [signer])
    r = mpota("push", tmp_path / "rel", "--port", repl.url, "--reset")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ota.update(): installed" in r.stdout and "2.0.0 verified in flash and set to boot" in r.stdout
    # the board resets, 2.0.0 passes its health check, confirms itself, resets once more
    st = wait_for(repl.url, lambda s: s["version"] == "2.0.0" and s["last_result"] != "installed")
    assert st["slots"]["ota_1"] == "VALID" and st["slot"] == "ota_1", st
    assert "reset: bootloader: ota_1 firmware 2.0.0" in repl.log


def test_a_tampered_release_is_refused_over_the_link_too(board, firmware, signer, tmp_path):
    d, repl = board
    from mpota import release
    rel = release.build(firmware("2.0.0"), tmp_path / "rel", [signer])
    p = tmp_path / "rel" / rel.manifest["payload"]["url"]
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(data)
    before = d.otadata()
    r = mpota("push", tmp_path / "rel", "--port", repl.url)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "hash-mismatch" in r.stdout
    assert d.otadata() == before and d.slot_bytes(1, 1) == b"\xff"  # nothing set to boot, no header left


def test_an_interrupted_push_resumes_at_the_next(board, firmware, signer, tmp_path):
    d, repl = board
    from mpota import release
    big = firmware("2.0.0", size=96 * 1024)
    release.build(big, tmp_path / "rel", [signer])
    d.config(watchdog_ms=3000, timeout_s=1, progress_every=2)
    lines = []
    done = pushmod.push(tmp_path / "rel", repl.url, timeout=30, echo=lines.append, stop_after=40000)
    assert done.result["result"] == "failed" and done.result["error"] == "network", lines
    lines.clear()
    done = pushmod.push(tmp_path / "rel", repl.url, timeout=30, echo=lines.append)
    assert done.result["result"] == "installed", lines
    out = "\n".join(lines)
    assert "ota: resuming 2.0.0 at" in out
    start = int(out.split("from byte ")[1].split()[0])
    assert 0 < start <= 40000, out
    assert done.sent < len(big.read_bytes())  # only the rest travelled


def test_push_says_what_is_wrong(tmp_path, firmware, make_device):
    r = mpota("push", tmp_path, "--port", "socket://127.0.0.1:9")
    assert r.returncode == 2 and "not a release directory" in r.stderr
    (tmp_path / "manifest.json").write_text("{}")
    r = mpota("push", tmp_path, "--port", "socket://127.0.0.1:9")
    assert r.returncode == 2 and "not an mpota manifest" in r.stderr


def test_push_to_a_port_where_nothing_listens(tmp_path, firmware, signer):
    from mpota import release
    release.build(firmware("2.0.0"), tmp_path / "rel", [signer])
    r = mpota("push", tmp_path / "rel", "--port", "socket://127.0.0.1:9")
    assert r.returncode == 2 and "cannot open socket://127.0.0.1:9" in r.stderr and "hint:" in r.stderr


def test_push_only_sends_the_release_files(tmp_path, firmware, signer):
    from mpota import release
    rel = release.build(firmware("2.0.0"), tmp_path / "rel", [signer])
    (tmp_path / "rel" / "release").write_text("-----BEGIN PRIVATE KEY-----\n")
    files = pushmod.release_files(tmp_path / "rel")
    assert sorted(files) == sorted(["/manifest.json", "/" + rel.manifest["payload"]["url"]])


def test_the_board_runs_boot_and_main_after_its_resets(server, firmware, make_device):
    # the simulated console behaves as a board's: powered on, and again after machine.reset(),
    # the bootloader runs, then boot.py and main.py, then the REPL
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/")
    (d.dev.fs / "boot.py").write_text("open('boots', 'a').write('b')\n")
    (d.dev.fs / "main.py").write_text("open('boots', 'a').write('m')\n")
    repl = SimRepl(d.dev.name, d.dev.path.parent)
    try:
        # first the power-on's boot.py and main.py end by themselves: mpremote's Ctrl-C would
        # interrupt main.py (as on a board) before it wrote its mark
        import time
        boots = d.dev.fs / "boots"
        for _ in range(200):
            if boots.exists() and boots.read_text() == "bm":
                break
            time.sleep(0.05)
        subprocess.run([tool("mpremote"), "connect", repl.url, "resume", "exec", "import machine; machine.reset()"],
                       capture_output=True, text=True, timeout=60)
        wait_for(repl.url, lambda s: (d.dev.fs / "boots").read_text() == "bmbm")
    finally:
        log = repl.stop()
    assert "power-on: bootloader: ota_0" in log and "sim repl: machine.reset()" in log
    assert "reset: bootloader: ota_0" in log
