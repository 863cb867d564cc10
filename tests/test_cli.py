"""The CLI surface: every command has --help, errors say what to do, the README story runs."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mpota.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
MPOTA = str(Path(sys.executable).parent / "mpota")

COMMANDS = [["keygen"], ["release"], ["verify"], ["inspect"], ["serve"], ["boards"], ["config"], ["mpy"],
            ["flash"], ["deploy"], ["push"], ["rollout"], ["rollout", "sign"], ["rollout", "show"],
            ["mirror"], ["mirror", "sync"],
            ["sim"], ["sim", "firmware"], ["sim", "create"], ["sim", "run"], ["sim", "status"], ["sim", "list"],
            ["sim", "delete"], ["sim", "repl"],
            ["fleet"], ["fleet", "serve"], ["fleet", "register"], ["fleet", "unregister"], ["fleet", "devices"],
            ["fleet", "device"], ["fleet", "events"], ["fleet", "releases"], ["fleet", "anomalies"],
            ["fleet", "import-logs"]]


def mpota(*args, cwd=None, check=False):
    r = subprocess.run([MPOTA, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_command_list_is_pinned():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert sorted(sub.choices) == sorted(c[0] for c in COMMANDS if len(c) == 1)


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_help(cmd):
    r = mpota(*cmd, "--help")
    assert r.returncode == 0 and "usage: mpota" in r.stdout


def test_keygen_writes_a_private_key_only_the_owner_can_read(tmp_path):
    r = mpota("keygen", tmp_path / "k" / "release", check=True)
    assert "key id:" in r.stdout
    mode = stat.S_IMODE(os.stat(tmp_path / "k" / "release").st_mode)
    assert mode == 0o600
    assert b"PRIVATE KEY" not in (tmp_path / "k" / "release.pub").read_bytes()
    assert "PRIVATE" not in r.stdout
    again = mpota("keygen", tmp_path / "k" / "release")
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr


def test_release_and_verify_errors_are_clear(tmp_path):
    mpota("keygen", tmp_path / "a", check=True)
    mpota("keygen", tmp_path / "b", check=True)
    mpota("sim", "firmware", tmp_path / "fw.bin", "--version", "2.0.0", "--size", "32K", check=True)
    r = mpota("release", tmp_path / "fw.bin", "--key", tmp_path / "a.pub", "--out", tmp_path / "rel")
    assert r.returncode == 2 and "public key" in r.stderr and "hint:" in r.stderr
    r = mpota("release", tmp_path / "fw.bin", "--key", tmp_path / "a", "--out", tmp_path / "rel",
              "--version", "2.0.1")
    assert r.returncode == 2 and "2.0.1" in r.stderr
    r = mpota("release", tmp_path / "fw.bin", "--key", tmp_path / "a", "--key", tmp_path / "a", "--out", tmp_path / "rel")
    assert r.returncode == 2 and "twice" in r.stderr
    mpota("release", tmp_path / "fw.bin", "--key", tmp_path / "a", "--out", tmp_path / "rel", check=True)
    assert "OK: 2.0.0" in mpota("verify", tmp_path / "rel", "--pub", tmp_path / "a.pub", check=True).stdout
    r = mpota("verify", tmp_path / "rel", "--pub", tmp_path / "b.pub")
    assert r.returncode == 2 and "no signature by a trusted key" in r.stderr
    (tmp_path / "junk.pub").write_bytes(b"not a key")
    r = mpota("verify", tmp_path / "rel", "--pub", tmp_path / "junk.pub")
    assert r.returncode == 2 and "is not a PEM public key" in r.stderr and "mpota keygen" in r.stderr
    fw = tmp_path / "rel" / "fw.bin"
    fw.write_bytes(fw.read_bytes()[:-1] + b"\x00")
    r = mpota("verify", tmp_path / "rel", "--pub", tmp_path / "a.pub")
    assert r.returncode == 2 and "SHA-256" in r.stderr
    r = mpota("sim", "firmware", tmp_path / "x.bin", "--version", "1.0.0", "--size", "lots")
    assert r.returncode == 2 and "not a size" in r.stderr
    for port in ("99999", "-1", "http"):
        r = mpota("serve", tmp_path / "rel", "--port", port)
        assert r.returncode == 2 and "give a TCP port from 0 to 65535" in r.stderr and "Traceback" not in r.stderr
    r = mpota("sim", "create", "d", "--pub", tmp_path / "a.pub", "--server", "http://h", "--firmware",
              tmp_path / "fw.bin", "--root", tmp_path / "devs", "--heap", "1K")
    assert r.returncode == 2 and "16K to 64M" in r.stderr
    r = mpota("flash", tmp_path / "fw.bin", "--dry-run", "--baud", "0")
    assert r.returncode == 2 and "baud rate from 9600" in r.stderr
    r = mpota("config", "--pub", tmp_path / "a.pub", "--server", "http://h", "--timeout", "0")
    assert r.returncode == 2 and "seconds from 1 to 300" in r.stderr


def test_sim_commands_point_to_the_next_step(tmp_path):
    r = mpota("sim", "run", "ghost", "--root", tmp_path)
    assert r.returncode == 2 and "mpota sim create ghost" in r.stderr
    mpota("keygen", tmp_path / "k", check=True)
    r = mpota("sim", "create", "d", "--pub", tmp_path / "k.pub", "--server", "http://x", "--firmware",
              tmp_path / "missing.bin", "--root", tmp_path)
    assert r.returncode == 2 and "mpota sim firmware" in r.stderr


def test_mpy_compiles_the_agent_for_every_board_arch(tmp_path):
    r = mpota("mpy", "--out", tmp_path, check=True)
    for arch in ("x64", "xtensawin", "rv32imc"):
        assert (tmp_path / arch / "ota" / "updater.mpy").exists()
        assert arch in r.stdout


def test_demo_runs_the_readme_story(tmp_path):
    # `make demo` end to end (README's commands), in a scratch directory.
    env = dict(os.environ, MPOTA_DEMO_DIR=str(tmp_path / "demo"))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo: OK" in r.stdout
    assert "\033[" not in r.stdout  # not a terminal: no escape codes
    assert f"files are in {tmp_path / 'demo'}/" in r.stdout and f"export PATH={ROOT}/.venv/bin:$PATH" in r.stdout
    st = json.loads(subprocess.run([MPOTA, "sim", "status", "dev1"], capture_output=True, text=True,
                                   cwd=tmp_path / "demo").stdout)
    assert st["version"] == "2.0.0" and st["last_error"] == "health-failed"


def test_outputs_that_cannot_be_written_are_errors_not_tracebacks(tmp_path):
    # an output under a regular file can be neither created nor written, for any user (root too)
    (tmp_path / "afile").write_text("")
    bad = tmp_path / "afile" / "sub"
    assert mpota("keygen", tmp_path / "k").returncode == 0
    assert mpota("sim", "firmware", tmp_path / "fw.bin", "--version", "1.0.0").returncode == 0
    for args in (("keygen", bad / "k"), ("keygen", "--aes", bad / "k.aes"),
                 ("sim", "firmware", bad / "fw.bin", "--version", "1.0.0"),
                 ("release", tmp_path / "fw.bin", "--key", tmp_path / "k", "--out", bad / "rel"),
                 ("config", "--pub", tmp_path / "k.pub", "--server", "http://h:1", "--out", bad / "c.json"),
                 ("mpy", "--arch", "x64", "--out", bad)):
        r = mpota(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert "mpota: error:" in r.stderr and "afile" in r.stderr, (args, r.stderr)


def test_a_damaged_simulated_device_says_so(tmp_path):
    # a flash file cut short (a full disk, a stray truncate) is not a bricked device
    mpota("keygen", tmp_path / "k", check=True)
    mpota("sim", "firmware", tmp_path / "fw.bin", "--version", "1.0.0", check=True)
    mpota("sim", "create", "d", "--pub", tmp_path / "k.pub", "--server", "http://127.0.0.1:9", "--firmware",
          tmp_path / "fw.bin", "--root", tmp_path / "devs", check=True)
    flash = tmp_path / "devs" / "d" / "flash.bin"
    flash.write_bytes(flash.read_bytes()[:100000])
    for verb in ("run", "status"):
        r = mpota("sim", verb, "d", "--root", tmp_path / "devs")
        assert r.returncode == 2 and "damaged" in r.stderr and "--force" in r.stderr and "bricked" not in r.stderr


def test_verify_of_an_encrypted_release_says_what_it_checked(tmp_path):
    mpota("keygen", tmp_path / "k", check=True)
    mpota("keygen", "--aes", tmp_path / "fw.aes", check=True)
    mpota("sim", "firmware", tmp_path / "fw.bin", "--version", "1.0.0", "--size", "32K", check=True)
    mpota("release", tmp_path / "fw.bin", "--key", tmp_path / "k", "--out", tmp_path / "rel",
          "--encrypt", tmp_path / "fw.aes", check=True)
    out = mpota("verify", tmp_path / "rel", "--pub", tmp_path / "k.pub", check=True).stdout
    assert "payload hashes verified" in out and "--aes" in out  # the image inside was not checked
    out = mpota("verify", tmp_path / "rel", "--pub", tmp_path / "k.pub", "--aes", tmp_path / "fw.aes", check=True).stdout
    assert "signature and hashes verified" in out


def test_a_device_name_cannot_reach_outside_the_root(tmp_path):
    # `sim create --force` removes the directory the name gives: '..' must not be one
    mpota("keygen", tmp_path / "k", check=True)
    mpota("sim", "firmware", tmp_path / "fw.bin", "--version", "1.0.0", check=True)
    (tmp_path / "root" / "devs").mkdir(parents=True)
    (tmp_path / "root" / "keep.txt").write_text("x")
    for name in ("..", "../x", "a/b", "dev 1"):
        r = mpota("sim", "create", name, "--pub", tmp_path / "k.pub", "--server", "http://h:1", "--firmware",
                  tmp_path / "fw.bin", "--root", tmp_path / "root" / "devs", "--force")
        assert r.returncode == 2 and "not a device name" in r.stderr, (name, r.stderr)
        r = mpota("sim", "status", name, "--root", tmp_path / "root" / "devs")
        assert r.returncode == 2 and "not a device name" in r.stderr
    assert (tmp_path / "root" / "keep.txt").exists()


@pytest.mark.parametrize("no_color", [False, True], ids=["terminal", "terminal+NO_COLOR"])
def test_demo_uses_bold_only_on_a_terminal_without_no_color(tmp_path, no_color):
    import pty
    import signal
    import time
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["MPOTA_DEMO_DIR"] = str(tmp_path / "demo")
    if no_color:
        env["NO_COLOR"] = "1"
    master, slave = pty.openpty()
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "demo.sh")], stdin=slave, stdout=slave, stderr=slave,
                            env=env, start_new_session=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + 60
    try:
        while b"== 1." not in out and time.monotonic() < deadline:
            out += os.read(master, 4096)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the first heading is all this test needs
        proc.wait()
        os.close(master)
    assert b"== 1. A release key" in out
    assert (b"\x1b[1m" in out) is not no_color
