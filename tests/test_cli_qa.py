"""QA from the command line: fault switches (power cuts in the simulator, a misbehaving server),
`sim list` / `sim delete`, machine-readable output (--json) and exit statuses, `mpota inspect`.
Every test drives the real `mpota` command."""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

MPOTA = str(Path(sys.executable).parent / "mpota")


def mpota(*args, cwd=None, check=False, timeout=300):
    r = subprocess.run([MPOTA, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


class Serve:
    """`mpota serve DIR --port 0 ...` in the background; .port is where it listens."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([MPOTA, "serve", *map(str, args), "--port", "0"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline()
        assert " on http://" in first, first + self.proc.stderr.read()
        self.url = first.split(" on ")[1].split()[0]
        self.port = int(self.url.rstrip("/").rsplit(":", 1)[1])
        self.lines = [first]

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        # read through the same buffered files that readline() used (communicate() would not)
        return "".join(self.lines) + self.proc.stdout.read() + self.proc.stderr.read()


def get(port, path, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path, headers=headers or {})
    r = c.getresponse()
    try:
        body = r.read()
    except http.client.IncompleteRead as e:
        body = e.partial
    c.close()
    return r.status, body


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Keys, firmware 1.0.0 and 2.0.0 and a release of 2.0.0, made by the CLI."""
    d = tmp_path_factory.mktemp("kit")
    mpota("keygen", d / "keys" / "release", check=True)
    for v in ("1.0.0", "2.0.0"):
        mpota("sim", "firmware", d / f"fw-{v}.bin", "--version", v, "--size", "64K", check=True)
    mpota("release", d / "fw-2.0.0.bin", "--key", d / "keys" / "release", "--out", d / "rel", check=True)
    return d


# ---- the misbehaving server: mpota serve --fault ------------------------------------------------

def test_serve_fault_switches(kit):
    size = (kit / "rel" / "fw-2.0.0.bin").stat().st_size
    s = Serve(kit / "rel", "--fault", "drop-after=1000,path=fw-2.0.0.bin,times=1",
              "--fault", "status=503,path=manifest.json,times=1,retry-after=60")
    try:
        status, body = get(s.port, "/fw-2.0.0.bin")
        assert status == 200 and len(body) == 1000           # dropped after 1000 bytes
        status, body = get(s.port, "/fw-2.0.0.bin")
        assert status == 200 and len(body) == size            # only the first time
        assert get(s.port, "/manifest.json")[0] == 503
        assert get(s.port, "/manifest.json")[0] == 200
        assert get(s.port, "/keys/release")[0] == 404          # still only the release
    finally:
        out = s.stop()
    assert "fault: drop-after=1000 on *fw-2.0.0.bin, 1 time(s)" in out
    assert "GET /fw-2.0.0.bin -> fault drop-after=1000" in out

    s = Serve(kit / "rel", "--fault", "ignore-range", "--quiet")
    try:
        status, body = get(s.port, "/fw-2.0.0.bin", {"Range": "bytes=100-"})
        assert status == 200 and len(body) == size
    finally:
        s.stop()
    s = Serve(kit / "rel", "--fault", "trickle=0.01,path=manifest.json", "--quiet")
    try:
        t0 = time.monotonic()
        status, body = get(s.port, "/manifest.json")
        assert status == 200 and time.monotonic() - t0 > 0.01 * len(body) * 0.8
    finally:
        s.stop()


def test_serve_fault_stall_keeps_the_connection_open(kit):
    import socket
    s = Serve(kit / "rel", "--fault", "stall-after=10,path=fw-2.0.0.bin", "--quiet")
    try:
        c = socket.create_connection(("127.0.0.1", s.port), timeout=2)
        c.sendall(b"GET /fw-2.0.0.bin HTTP/1.0\r\n\r\n")
        got = b""
        with pytest.raises(socket.timeout):
            while True:
                data = c.recv(4096)
                assert data, "the server closed a stalled connection"
                got += data
        assert got.endswith(b"\r\n\r\n" + (kit / "rel" / "fw-2.0.0.bin").read_bytes()[:10])
        c.close()
    finally:
        s.stop()


@pytest.mark.parametrize("spec,message", [
    ("drop-after", "drop-after needs a value"),
    ("drop-after=-1", "must be 0 or more"),
    ("status=42", "HTTP status from 100 to 599"),
    ("trickle=99", "at most 10 seconds"),
    ("explode=1", "is not a fault (one of: drop-after, stall-after, trickle, status, ignore-range)"),
    ("status=503,when=1", "is not a fault option"),
    ("ignore-range=1", "ignore-range takes no value"),
])
def test_serve_fault_spec_errors(kit, spec, message):
    r = mpota("serve", kit / "rel", "--fault", spec, "--port", "0")
    assert r.returncode == 2 and message in r.stderr, r.stderr


# ---- sim list, sim delete -----------------------------------------------------------------------

def test_sim_list_and_delete(kit, tmp_path):
    root = tmp_path / "devs"
    assert "no simulated devices in" in mpota("sim", "list", "--root", root, check=True).stdout
    for name in ("a", "b"):
        mpota("sim", "create", name, "--pub", kit / "keys" / "release.pub", "--server", "http://127.0.0.1:9",
              "--firmware", kit / "fw-1.0.0.bin", "--root", root, check=True)
    mpota("sim", "run", "a", "--root", root)  # the server is not there: the update check fails
    (root / "notes").mkdir()
    out = mpota("sim", "list", "--root", root, check=True).stdout.splitlines()
    assert out[0].split() == ["NAME", "VERSION", "SLOT", "LAST", "RESULT"]
    assert out[1].split()[:3] == ["a", "1.0.0", "ota_0"] and "network" in out[1]
    assert out[2].split()[:2] == ["b", "(never"] and len(out) == 3  # notes/ is not a device
    rows = json.loads(mpota("sim", "list", "--root", root, "--json", check=True).stdout)
    assert [r["name"] for r in rows] == ["a", "b"]
    assert rows[0]["version"] == "1.0.0" and rows[0]["slot"] == "ota_0" and rows[0]["last_error"] == "network"
    assert rows[1]["version"] is None and rows[1]["path"] == str((root / "b").resolve())

    r = mpota("sim", "delete", "notes", "--root", root)
    assert r.returncode == 2 and "not a simulated device" in r.stderr and (root / "notes").is_dir()
    r = mpota("sim", "delete", "..", "--root", root)
    assert r.returncode == 2 and "not a device name" in r.stderr
    r = mpota("sim", "delete", "ghost", "--root", root)
    assert r.returncode == 2 and "no simulated device 'ghost'" in r.stderr
    assert "deleted" in mpota("sim", "delete", "a", "--root", root, check=True).stdout
    assert sorted(p.name for p in root.iterdir()) == ["b", "notes"]


# ---- sim run: power cuts, --json, exit statuses --------------------------------------------------

def _device(kit, root, name, server_url):
    mpota("sim", "create", name, "--pub", kit / "keys" / "release.pub", "--server", server_url,
          "--firmware", kit / "fw-1.0.0.bin", "--root", root, check=True)


def test_sim_run_json_expect_version_and_power_cuts(kit, tmp_path):
    s = Serve(kit / "rel", "--quiet")
    try:
        _device(kit, tmp_path, "a", s.url)
        r = mpota("sim", "run", "a", "--root", tmp_path, "--json", "--expect-version", "2.0.0")
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)  # stdout is the JSON document alone; the boot log is on stderr
        assert "[boot 1] bootloader" in r.stderr
        assert out["ok"] is True and out["problems"] == [] and out["end"] == "idle"
        assert out["version"] == "2.0.0" and out["slot"] == "ota_1" and out["last_result"] in ("confirmed", "up-to-date")
        assert [b["version"] for b in out["boots"]][:2] == ["1.0.0", "2.0.0"] and out["power_cut"] is None
        assert out["status"]["version"] == "2.0.0"
        ops = out["flash_ops"]
        assert ops > 10
        r = mpota("sim", "run", "a", "--root", tmp_path, "--expect-version", "9.9.9")
        assert r.returncode == 1 and "not as expected: expected to end on 9.9.9, runs 2.0.0" in r.stdout

        # the same update with the power cut half-way through (torn): it still ends on 2.0.0
        _device(kit, tmp_path, "b", s.url)
        r = mpota("sim", "run", "b", "--root", tmp_path, "--cut-at", ops // 2, "--tear", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["power_cut"] == {"at": ops // 2, "tear": True, "fired": True}
        assert "power-loss" in [b["exit"] for b in out["boots"]] and out["version"] == "2.0.0"
        _device(kit, tmp_path, "c", s.url)
        r = mpota("sim", "run", "c", "--root", tmp_path, "--cut-at", 10 ** 6)
        assert r.returncode == 0 and "power cut at flash operation 1000000: not reached" in r.stdout
        r = mpota("sim", "run", "c", "--root", tmp_path, "--tear")
        assert r.returncode == 2 and "--tear needs --cut-at" in r.stderr
    finally:
        s.stop()


def test_sim_run_exits_1_when_the_update_fails_or_is_refused(kit, tmp_path):
    s = Serve(kit / "rel", "--quiet", "--fault", "status=503,path=manifest.json")
    try:
        _device(kit, tmp_path, "a", s.url)
        r = mpota("sim", "run", "a", "--root", tmp_path)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "not as expected: the last update ended failed (http-503" in r.stdout
    finally:
        s.stop()
    mpota("keygen", tmp_path / "other", check=True)
    mpota("release", kit / "fw-2.0.0.bin", "--key", tmp_path / "other", "--out", tmp_path / "foreign", check=True)
    s = Serve(tmp_path / "foreign", "--quiet")
    try:
        _device(kit, tmp_path, "b", s.url)
        r = mpota("sim", "run", "b", "--root", tmp_path, "--json")
        assert r.returncode == 1
        out = json.loads(r.stdout)
        assert out["ok"] is False and out["last_result"] == "refused" and out["last_error"] == "unknown-key"
        assert out["version"] == "1.0.0"
    finally:
        s.stop()


# ---- mpota inspect --------------------------------------------------------------------------------

SHARED_FW = Path(__file__).resolve().parents[1].parent / "shared" / "firmware"


def test_inspect_an_app_image_agrees_with_esptool(tmp_path):
    import hashlib

    from esptool.bin_image import LoadFirmwareImage
    fw = tmp_path / "fw.bin"
    mpota("sim", "firmware", fw, "--version", "4.5.6", "--secure-version", "3", "--min-chip-rev", "1.0",
          "--max-chip-rev", "3.99", "--size", "32K", check=True)
    rep = json.loads(mpota("inspect", fw, "--json", check=True).stdout)
    assert rep["kind"] == "app" and rep["chip"] == "esp32" and rep["chip_id"] == 0
    assert rep["app"]["version"] == "4.5.6" and rep["app"]["secure_version"] == 3
    assert rep["app"]["project"] == "mpota-sim" and rep["min_chip_rev"] == "v1.0" and rep["max_chip_rev"] == "v3.99"
    assert rep["sha256"] == hashlib.sha256(fw.read_bytes()).hexdigest() and rep["file_size"] == fw.stat().st_size
    assert rep["hash_valid"] is True and rep["checksum"]["valid"] is True and rep["valid"] is True
    img = LoadFirmwareImage("esp32", str(fw))  # the independent reader
    assert [(s["load_address"], s["length"]) for s in rep["segments"]] == [(s.addr, len(s.data)) for s in img.segments]
    assert rep["entry_point"] == img.entrypoint
    text = mpota("inspect", fw, check=True).stdout
    assert "version:           4.5.6" in text and "(valid)" in text and "segments:          2" in text
    # a damaged image is reported, not refused
    data = bytearray(fw.read_bytes())
    data[1000] ^= 0xFF
    fw.write_bytes(bytes(data))
    r = mpota("inspect", fw, "--json")
    assert r.returncode == 0
    rep = json.loads(r.stdout)
    assert rep["hash_valid"] is False and rep["checksum"]["valid"] is False and rep["valid"] is False
    assert "checksum mismatch" in rep["problems"] and "INVALID" in mpota("inspect", fw).stdout


def test_inspect_a_release_and_its_signatures(kit, tmp_path):
    rep = json.loads(mpota("inspect", kit / "rel", "--json", check=True).stdout)
    assert rep["kind"] == "release" and rep["version"] == "2.0.0" and rep["board"] == "esp32"
    assert rep["chip"] == "esp32" and rep["security_counter"] == 0
    assert rep["payload"]["url"] == "fw-2.0.0.bin" and rep["payload"]["encoding"] == "raw"
    assert rep["payload_file"] == {"present": True, "size": rep["payload"]["size"], "sha256_valid": True}
    assert [s["valid"] for s in rep["signatures"]] == [None] and rep["verified"] is None
    rep = json.loads(mpota("inspect", kit / "rel", "--pub", kit / "keys" / "release.pub", "--json", check=True).stdout)
    assert rep["signatures"][0]["trusted"] is True and rep["signatures"][0]["valid"] is True
    assert rep["verified"] is True and rep["valid"] is True
    mpota("keygen", tmp_path / "other", check=True)
    rep = json.loads(mpota("inspect", kit / "rel" / "manifest.json", "--pub", tmp_path / "other.pub", "--json",
                           check=True).stdout)
    assert rep["kind"] == "manifest" and rep["signatures"][0]["trusted"] is False and rep["verified"] is False
    assert any("no signature by a trusted key" in p for p in rep["problems"])
    # chunked, compressed and encrypted; then a tampered payload
    mpota("keygen", "--aes", tmp_path / "fw.aes", check=True)
    mpota("release", kit / "fw-2.0.0.bin", "--key", kit / "keys" / "release", "--out", tmp_path / "rel",
          "--compress", "--encrypt", tmp_path / "fw.aes", "--chunk", "16K", check=True)
    rep = json.loads(mpota("inspect", tmp_path / "rel", "--json", check=True).stdout)
    pl = rep["payload"]
    assert pl["encoding"] == "deflate" and pl["chunks"] == 4 and pl["chunk"] == 16384 and pl["wbits"] == 10
    assert pl["encryption"]["alg"] == "aes-256-cbc" and len(pl["encryption"]["keyid"]) == 16
    f = tmp_path / "rel" / pl["url"]
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    r = mpota("inspect", tmp_path / "rel", "--pub", kit / "keys" / "release.pub")
    assert r.returncode == 0 and "sha256 INVALID" in r.stdout and "verified:          no" in r.stdout


@pytest.mark.skipif(not (SHARED_FW / "ESP32_GENERIC-OTA-20250415-v1.25.0.bin").exists(),
                    reason="../shared/firmware/ESP32_GENERIC-OTA-20250415-v1.25.0.bin is absent (a user's own clone)")
def test_inspect_a_real_merged_micropython_image():
    rep = json.loads(mpota("inspect", SHARED_FW / "ESP32_GENERIC-OTA-20250415-v1.25.0.bin", "--json", check=True).stdout)
    assert rep["kind"] == "merged" and rep["bootloader"]["offset"] == 0x1000 and rep["bootloader"]["chip"] == "esp32"
    assert [p["label"] for p in rep["partitions"]][:5] == ["nvs", "otadata", "phy_init", "ota_0", "ota_1"]
    app = rep["app"]
    assert app["chip"] == "esp32" and app["app"]["version"] == "" and app["app"]["idf_version"] == "v5.2.2"
    assert app["hash_valid"] is True and app["valid"] is True and app["max_chip_rev"] == "v3.99"


def test_json_output_of_boards_and_verify(kit, tmp_path):
    boards = json.loads(mpota("boards", "--json", check=True).stdout)
    by = {b["name"]: b for b in boards}
    assert set(by) >= {"esp32", "esp32s3", "esp32c3", "unix"} and by["unix"]["emulates"] == "esp32"
    assert by["esp32"]["chip"] == "esp32" and by["esp32"]["bootloader_offset"] == "0x1000"
    assert [s["label"] for s in by["esp32"]["ota_slots"]] == ["ota_0", "ota_1"]
    assert by["esp32"]["ota_slots"][0]["size"] == 0x180000
    out = json.loads(mpota("verify", kit / "rel", "--pub", kit / "keys" / "release.pub", "--json", check=True).stdout)
    assert out["ok"] is True and out["version"] == "2.0.0" and out["image_checked"] is True
    assert out["payload"]["url"] == "fw-2.0.0.bin" and out["signed_by"] == [out["keyids"][0]]
    mpota("keygen", tmp_path / "other", check=True)
    r = mpota("verify", kit / "rel", "--pub", tmp_path / "other.pub", "--json")
    assert r.returncode == 2 and "no signature by a trusted key" in r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["error"]["code"] == "unknown-key" and out["error"]["hint"]
    # sim status is JSON with or without --json
    mpota("sim", "create", "d", "--pub", kit / "keys" / "release.pub", "--server", "http://127.0.0.1:9",
          "--firmware", kit / "fw-1.0.0.bin", "--root", tmp_path, check=True)
    st = json.loads(mpota("sim", "status", "d", "--root", tmp_path, "--json", check=True).stdout)
    assert st["version"] == "1.0.0" and st["slot"] == "ota_0"


# ---- errors: no command, typos, a reader that goes away ----------------------------------------

def test_no_command_and_typos_get_a_hint():
    r = mpota()
    assert r.returncode == 2 and "usage: mpota" in r.stderr and "hint:" in r.stderr and "mpota --help" in r.stderr
    r = mpota("relase", "fw.bin")
    assert r.returncode == 2 and "did you mean 'release'?" in r.stderr and "hint:" in r.stderr
    r = mpota("sim", "stauts", "dev1")
    assert r.returncode == 2 and "did you mean 'status'?" in r.stderr
    r = mpota("sim", "firmware", "x.bin", "--version", "1.0.0", "--behavior", "helthy")
    assert r.returncode == 2 and "did you mean 'healthy'?" in r.stderr
    r = mpota("zzzz")
    assert r.returncode == 2 and "did you mean" not in r.stderr and "invalid choice" in r.stderr


def test_a_reader_that_goes_away_ends_the_output_quietly(kit, tmp_path):
    import os
    mpota("sim", "create", "d", "--pub", kit / "keys" / "release.pub", "--server", "http://127.0.0.1:9",
          "--firmware", kit / "fw-1.0.0.bin", "--root", tmp_path, check=True)
    for args in (["boards"], ["sim", "status", "d", "--root", tmp_path], ["inspect", kit / "rel", "--json"]):
        r, w = os.pipe()
        os.close(r)  # as `| head -1` does once it has its line (here: before the first byte)
        p = subprocess.run([MPOTA, *map(str, args)], stdout=w, stderr=subprocess.PIPE, text=True)
        os.close(w)
        assert p.returncode == 0 and p.stderr == "", (args, p.stderr)
    # and through a real `head -1`
    p = subprocess.run(f"'{MPOTA}' boards | head -1; echo \"rc=${{PIPESTATUS[0]}}\"", shell=True,
                       executable="/bin/bash", capture_output=True, text=True)
    assert p.stdout.splitlines()[0].startswith("esp32") and "rc=0" in p.stdout and p.stderr == ""
