"""The package as a user gets it: build the wheel, install it into a fresh venv (with its
dependencies, as pip resolves them), and run the demo story there with that venv's `mpota`, in
a directory far from this checkout. Slow (a venv and an install: about a minute), and part of
`make test` all the same: it is the only test of what `pip install mpota` gives."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    d = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(d / "dist"),
                        "--quiet", "--disable-pip-version-check"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list((d / "dist").glob("mpota-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([sys.executable, "-m", "venv", str(d / "venv")], check=True, timeout=300)
    r = subprocess.run([str(d / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", str(wheels[0])], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return d / "venv" / "bin"


def run(bin_dir, *args, cwd, check=True, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}/usr/bin:/bin"
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{args}\n{r.stdout}\n{r.stderr}"
    return r


def test_the_installed_package_is_self_contained(venv, tmp_path):
    where = run(venv, venv / "python", "-c", "import mpota; print(mpota.__file__, mpota.DEVICE_DIR, mpota.BOARDS_DIR)",
                cwd=tmp_path).stdout.split()
    assert all(str(venv.parent) in w for w in where), where  # nothing comes from this checkout
    assert run(venv, venv / "python", "-m", "mpota", "--version", cwd=tmp_path).stdout.strip() == "mpota 0.1.0"
    boards = run(venv, venv / "mpota", "boards", cwd=tmp_path).stdout
    for name in ("esp32", "esp32s3", "esp32c3", "unix"):
        assert any(line.startswith(name + " ") for line in boards.splitlines()), boards


def test_the_demo_story_with_the_installed_mpota(venv, tmp_path):
    m = venv / "mpota"
    run(venv, m, "keygen", "keys/release", cwd=tmp_path)
    run(venv, m, "sim", "firmware", "fw-1.0.0.bin", "--version", "1.0.0", cwd=tmp_path)
    run(venv, m, "sim", "firmware", "fw-2.0.0.bin", "--version", "2.0.0", cwd=tmp_path)
    run(venv, m, "release", "fw-2.0.0.bin", "--key", "keys/release", "--out", "release/", cwd=tmp_path)
    assert "OK: 2.0.0" in run(venv, m, "verify", "release/", "--pub", "keys/release.pub", cwd=tmp_path).stdout
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    server = subprocess.Popen([str(m), "serve", "release/", "--port", str(port), "--quiet"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, server.communicate()
                time.sleep(0.1)
        run(venv, m, "sim", "create", "dev1", "--pub", "keys/release.pub", "--server", f"http://127.0.0.1:{port}",
            "--firmware", "fw-1.0.0.bin", cwd=tmp_path)
        r = run(venv, m, "sim", "run", "dev1", "--expect-version", "2.0.0", cwd=tmp_path)
        assert "running 2.0.0 from ota_1" in r.stdout
    finally:
        server.terminate()
        server.communicate(timeout=10)
    st = json.loads(run(venv, m, "sim", "status", "dev1", cwd=tmp_path).stdout)
    assert st["version"] == "2.0.0" and st["slot"] == "ota_1" and st["slots"]["ota_1"] == "VALID"
    assert st["last_error"] is None
