"""The CLI never hurts the user: no secret leaves its place, nothing is written that a device
would refuse or that bricks a board, no simulated device is used by two commands at once.
Every test drives the real `mpota` command."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MPOTA = str(Path(sys.executable).parent / "mpota")


def mpota(*args, cwd=None, check=False, timeout=300):
    r = subprocess.run([MPOTA, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Keys (Ed25519 and AES) and simulated firmware 1.0.0 and 2.0.0, made by the CLI."""
    d = tmp_path_factory.mktemp("kit")
    mpota("keygen", d / "keys" / "release", check=True)
    mpota("keygen", "--aes", d / "keys" / "fw.aes", check=True)
    for v in ("1.0.0", "2.0.0"):
        mpota("sim", "firmware", d / f"fw-{v}.bin", "--version", v, "--size", "32K", check=True)
    return d


# ---- a private key where a public key belongs -------------------------------------------------

def test_a_private_key_given_as_the_trusted_key_is_refused_everywhere(kit, tmp_path):
    priv = kit / "keys" / "release"
    mpota("release", kit / "fw-2.0.0.bin", "--key", priv, "--out", tmp_path / "rel", check=True)
    cases = {
        "verify": ["verify", tmp_path / "rel", "--pub", priv],
        "sim create": ["sim", "create", "d", "--pub", priv, "--server", "http://127.0.0.1:9",
                       "--firmware", kit / "fw-1.0.0.bin", "--root", tmp_path / "devs"],
        "config": ["config", "--pub", priv, "--server", "http://h:1", "--out", tmp_path / "cfg" / "c.json"],
        "deploy": ["deploy", "--port", "/dev/null", "--dry-run", "--pub", priv, "--server", "http://h:1",
                   "--stage", tmp_path / "stage"],
    }
    for what, args in cases.items():
        r = mpota(*args, cwd=tmp_path)
        assert r.returncode == 2, (what, r.stdout, r.stderr)
        assert "is a private key" in r.stderr and "release.pub" in r.stderr, (what, r.stderr)
    # nothing was written that could carry the key anywhere
    assert not (tmp_path / "devs" / "d").exists()
    assert not (tmp_path / "cfg").exists()
    assert not (tmp_path / "stage").exists()
    # the public key works in the same places
    assert mpota("verify", tmp_path / "rel", "--pub", str(priv) + ".pub").returncode == 0


# ---- device files that hold secrets ------------------------------------------------------------

def test_config_with_an_aes_key_is_owner_only_and_lands_where_git_ignores_it(kit, tmp_path):
    r = mpota("config", "--pub", kit / "keys" / "release.pub", "--server", "http://h:1",
              "--aes-key", kit / "keys" / "fw.aes", cwd=tmp_path, check=True)
    out = tmp_path / "build" / "device" / "ota_config.json"
    assert out.is_file() and not (tmp_path / "ota_config.json").exists()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "0600" in r.stdout
    assert json.loads(out.read_text())["aes_keys"]
    # the default location is one this repository's .gitignore covers
    ignored = subprocess.run(["git", "check-ignore", "-q", "build/device/ota_config.json"], cwd=ROOT)
    assert ignored.returncode == 0
    # an existing world-readable file is replaced by an owner-only one
    old = tmp_path / "old.json"
    old.write_text("{}")
    os.chmod(old, 0o644)
    mpota("config", "--pub", kit / "keys" / "release.pub", "--server", "http://h:1",
          "--aes-key", kit / "keys" / "fw.aes", "--out", old, check=True)
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


def test_simulated_and_staged_configs_with_aes_keys_are_owner_only(kit, tmp_path):
    mpota("sim", "create", "d", "--pub", kit / "keys" / "release.pub", "--server", "http://127.0.0.1:9",
          "--firmware", kit / "fw-1.0.0.bin", "--aes-key", kit / "keys" / "fw.aes", "--root", tmp_path, check=True)
    assert stat.S_IMODE((tmp_path / "d" / "fs" / "ota_config.json").stat().st_mode) == 0o600
    mpota("deploy", "--port", "/dev/null", "--dry-run", "--pub", kit / "keys" / "release.pub", "--server",
          "http://h:1", "--aes-key", kit / "keys" / "fw.aes", "--stage", tmp_path / "stage", check=True)
    assert stat.S_IMODE((tmp_path / "stage" / "ota_config.json").stat().st_mode) == 0o600


# ---- mpota release refuses what devices would refuse -------------------------------------------

def test_release_refuses_what_devices_would_refuse_unless_forced(kit, tmp_path):
    key = kit / "keys" / "release"
    big = tmp_path / "big.bin"
    mpota("sim", "firmware", big, "--version", "3.0.0", "--size", "1600K", check=True)  # esp32 slots: 1.5 MiB
    s3 = tmp_path / "s3.bin"
    mpota("sim", "firmware", s3, "--version", "3.0.0", "--chip", "esp32s3", "--size", "32K", check=True)
    refusals = [
        (["release", big, "--key", key, "--out", tmp_path / "r1"], ["OTA slots hold 1572864", "too-large"]),
        (["release", kit / "fw-2.0.0.bin", "--key", key, "--out", tmp_path / "r2", "--board", "esp32s3"],
         ["board esp32s3 is an esp32s3; the image is for esp32", "wrong-chip"]),
        (["release", s3, "--key", key, "--out", tmp_path / "r3", "--board", "esp32"],
         ["board esp32 is an esp32; the image is for esp32s3"]),
        (["release", kit / "fw-2.0.0.bin", "--key", key, "--out", tmp_path / "r4", "--board", "esp32-cam"],
         ["no board definition has board id 'esp32-cam'"]),
    ]
    for args, messages in refusals:
        r = mpota(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        for m in messages:
            assert m in r.stderr, (m, r.stderr)
        assert "--force" in r.stderr
        assert not Path(args[args.index("--out") + 1]).exists()  # nothing signed, nothing written
    # the rare deliberate case
    r = mpota("release", kit / "fw-2.0.0.bin", "--key", key, "--out", tmp_path / "r4", "--board", "esp32-cam",
              "--force", check=True)
    assert "--force" in r.stdout and (tmp_path / "r4" / "manifest.json").exists()


def test_release_refuses_a_version_not_newer_than_the_one_published(kit, tmp_path):
    key, out = kit / "keys" / "release", tmp_path / "rel"
    mpota("release", kit / "fw-2.0.0.bin", "--key", key, "--out", out, check=True)
    before = (out / "manifest.json").read_bytes()
    r = mpota("release", kit / "fw-1.0.0.bin", "--key", key, "--out", out)
    assert r.returncode == 2 and "already holds 2.0.0; 1.0.0 is older" in r.stderr and "downgrade" in r.stderr
    r = mpota("release", kit / "fw-2.0.0.bin", "--key", key, "--out", out)
    assert r.returncode == 2 and "2.0.0 is the same version" in r.stderr and "--force" in r.stderr
    assert (out / "manifest.json").read_bytes() == before
    mpota("release", kit / "fw-1.0.0.bin", "--key", key, "--out", out, "--force", check=True)
    assert (out / "manifest.json").read_bytes() != before


def test_is_newer_is_the_devices_order():
    from mpota.release import is_newer
    assert is_newer("2.0.0", "1.9.9") and is_newer("1.10", "1.9") and is_newer("v2", "1.99.99.99")
    assert not is_newer("2.0", "2.0.0") and not is_newer("2.0.0", "2.0") and not is_newer("1.0.0", "2.0.0")


# ---- a simulated device is used by one command at a time ---------------------------------------

def _create(kit, root, name="d", *extra, firmware=None):
    return mpota("sim", "create", name, "--pub", kit / "keys" / "release.pub", "--server", "http://127.0.0.1:9",
                 "--firmware", firmware or kit / "fw-1.0.0.bin", "--root", root, *extra)


def test_a_running_device_is_not_used_by_a_second_command(kit, tmp_path):
    import time
    hang = tmp_path / "hang.bin"
    mpota("sim", "firmware", hang, "--version", "1.0.0", "--behavior", "hang", "--size", "32K", check=True)
    assert _create(kit, tmp_path, firmware=hang).returncode == 0
    run = subprocess.Popen([MPOTA, "sim", "run", "d", "--root", tmp_path, "--hang-after", "6"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "d" / "lock"
        deadline = time.monotonic() + 30
        while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for args in (["sim", "status", "d"], ["sim", "run", "d"], ["sim", "delete", "d"],
                     ["sim", "repl", "d", "--port", "0", "--once"]):
            r = mpota(*args, "--root", tmp_path, timeout=60)
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert f"is in use by PID {run.pid} (mpota sim run)" in r.stderr, (args, r.stderr)
            assert str((tmp_path / "d").resolve()) in r.stderr and "hint:" in r.stderr
        r = _create(kit, tmp_path, "d", "--force")
        assert r.returncode == 2 and f"in use by PID {run.pid}" in r.stderr
    finally:
        out, err = run.communicate(timeout=120)
    assert run.returncode == 1 and "hung" in out, out + err  # the run itself went on undisturbed
    # once it is done, the device is free again
    assert mpota("sim", "status", "d", "--root", tmp_path).returncode == 0


def test_a_running_console_holds_the_device(kit, tmp_path):
    # `sim repl` runs the device as a board for as long as it runs: nothing else may write its
    # flash meanwhile; when it stops, the device is free
    assert _create(kit, tmp_path).returncode == 0
    repl = subprocess.Popen([MPOTA, "sim", "repl", "d", "--port", "0", "--root", tmp_path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        repl.stdout.readline()
        r = mpota("sim", "run", "d", "--root", tmp_path)
        assert r.returncode == 2 and f"in use by PID {repl.pid} (mpota sim repl)" in r.stderr, r.stderr
    finally:
        repl.terminate()
        repl.communicate(timeout=10)
    assert mpota("sim", "status", "d", "--root", tmp_path).returncode == 0


def test_sim_create_that_fails_half_way_leaves_nothing_behind(kit, tmp_path):
    big = tmp_path / "big.bin"
    mpota("sim", "firmware", big, "--version", "1.0.0", "--size", "1600K", check=True)  # larger than ota_0
    r = _create(kit, tmp_path / "devs", firmware=big)
    assert r.returncode == 2 and "slot ota_0 holds" in r.stderr
    assert not (tmp_path / "devs").exists() or list((tmp_path / "devs").iterdir()) == []
    # --force over a working device: the old one stays as it was
    assert _create(kit, tmp_path / "devs").returncode == 0
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "devs").rglob("*"))
    r = _create(kit, tmp_path / "devs", "d", "--force", firmware=big)
    assert r.returncode == 2
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "devs").rglob("*")) == before
    # and --force replaces only a simulated device
    (tmp_path / "devs" / "notes").mkdir()
    (tmp_path / "devs" / "notes" / "todo.txt").write_text("keep")
    r = _create(kit, tmp_path / "devs", "notes", "--force")
    assert r.returncode == 2 and "is not a simulated device" in r.stderr
    assert (tmp_path / "devs" / "notes" / "todo.txt").read_text() == "keep"


def test_a_missing_device_is_named_with_its_absolute_path_and_root(tmp_path):
    r = mpota("sim", "status", "ghost", "--root", "devs", cwd=tmp_path)
    assert r.returncode == 2
    assert f"no simulated device 'ghost' in {(tmp_path / 'devs').resolve()}/ (--root devs)" in r.stderr
    assert "--root DIR" in r.stderr and "mpota sim create ghost" in r.stderr


# ---- ESP8266 images are told apart and refused with that reason --------------------------------

ESP8266 = sorted((ROOT.parent / "shared" / "firmware").glob("esp8266-*.bin"))


@pytest.mark.skipif(not ESP8266, reason="../shared/firmware/esp8266-*.bin are absent (a user's own clone)")
@pytest.mark.parametrize("image", ESP8266, ids=lambda p: p.name)
def test_esp8266_images_are_recognised_and_refused(kit, tmp_path, image):
    from mpota import espimage
    assert espimage.is_esp8266(image.read_bytes())
    esptool = subprocess.run([str(Path(sys.executable).parent / "esptool"), "image-info", str(image)],
                             capture_output=True, text=True)
    assert "Detected image type: ESP8266" in esptool.stdout  # the independent reader agrees
    assert not espimage.is_esp8266((kit / "fw-1.0.0.bin").read_bytes())
    for args in (["release", image, "--key", kit / "keys" / "release", "--out", tmp_path / "rel"],
                 ["release", image, "--key", kit / "keys" / "release", "--out", tmp_path / "rel", "--force"],
                 ["sim", "create", "d", "--pub", kit / "keys" / "release.pub", "--server", "http://h:1",
                  "--firmware", image, "--root", tmp_path / "devs"],
                 ["flash", image, "--board", "esp32", "--dry-run", "--out", tmp_path / "flash"],
                 ["inspect", image]):
        r = mpota(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "this is an ESP8266 image" in r.stderr and "ESP32" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "rel").exists() and not (tmp_path / "devs" / "d").exists()
