"""`mpota deploy` and `mpota sim repl`, for real: the simulated device's REPL (the real
micropython unix port on a pseudo-terminal) is served on a loopback TCP port, real mpremote
copies the agent, config and main.py to it, and the deployed agent then updates the device.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mpota import deploy, devicepkg
from mpota.sim import device
from conftest import SimRepl

BIN = Path(sys.executable).parent
MPOTA = str(BIN / "mpota")
MPREMOTE = str(BIN / "mpremote")
ROOT = Path(__file__).resolve().parents[1]


def mpota(*args, cwd=None, timeout=180):
    return subprocess.run([MPOTA, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.fixture
def bare_device(tmp_path, keydir, firmware):
    """A simulated ESP32 running firmware 1.0.0 with an empty filesystem: nothing of mpota on it."""
    root = tmp_path / "devices"
    dev = device.create("dev", [keydir / "release.pub"], "http://127.0.0.1:9", firmware("1.0.0"), root=root)
    for p in dev.fs.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return dev


@pytest.fixture
def repl(bare_device):
    r = SimRepl("dev", bare_device.path.parent)
    yield r
    r.stop()


def test_deploy_then_the_deployed_agent_updates_the_device(bare_device, repl, server, firmware, signer,
                                                          keydir, tmp_path):
    server.publish(firmware("2.0.0"), signer)
    r = mpota("deploy", "--port", repl.url, "--pub", keydir / "release.pub", "--server", server.url,
              "--status", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "board unix" in r.stdout and "x64" in r.stdout
    n = len(devicepkg.agent_sources()) + 2  # the agent, ota_config.json, main.py
    assert f"{n} files, {n} copied, 0 already up to date" in r.stdout
    status = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert status["version"] == "1.0.0" and status["slot"] == "ota_0"

    # What is on the device is what mpy-cross makes for the board's architecture...
    fs = bare_device.fs
    ref = devicepkg.install_agent(tmp_path / "ref", arch="x64")
    assert sorted(p.name for p in (fs / "lib" / "ota").iterdir()) == sorted(p.name for p in ref)
    for p in ref:
        assert (fs / "lib" / "ota" / p.name).read_bytes() == p.read_bytes(), p.name
    cfg = json.loads((fs / "ota_config.json").read_text())
    assert cfg["server"] == server.url and cfg["chip"] == "esp32" and cfg["device_id"] == bare_device.hardware_env()["MPOTA_UID"]
    assert (fs / "main.py").read_bytes() == (ROOT / "boards" / "unix" / "main.py").read_bytes()

    # ... and it works: boot, update to 2.0.0, reboot, confirm. The console holds the device
    # while it runs it as a board: `sim run` waits for it to stop.
    r = mpota("sim", "run", "dev", "--root", bare_device.path.parent)
    assert r.returncode == 2 and "in use by PID" in r.stderr, r.stdout + r.stderr
    repl.stop()
    r = mpota("sim", "run", "dev", "--root", bare_device.path.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "running 2.0.0 from ota_1" in r.stdout
    st = json.loads(mpota("sim", "status", "dev", "--root", bare_device.path.parent).stdout)
    assert st["version"] == "2.0.0" and st["slots"]["ota_1"] == "VALID"


def test_a_second_deploy_copies_only_what_changed(bare_device, repl, keydir, tmp_path):
    args = ["deploy", "--port", repl.url, "--pub", keydir / "release.pub", "--server", "http://10.0.0.1:8000"]
    assert mpota(*args, cwd=tmp_path).returncode == 0
    stale = bare_device.fs / "lib" / "ota" / "updater.py"  # a source that would shadow updater.mpy
    stale.write_text("raise ImportError('stale')\n")
    (bare_device.fs / "main.py").write_text("# the user's application\n")
    r = mpota(*args[:-1], "http://10.0.0.2:8000", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "removed stale lib/ota/updater.py" in r.stdout and not stale.exists()
    n = len(devicepkg.agent_sources()) + 1  # main.py is the user's now: not copied
    assert f"{n} files, 1 copied, {n - 1} already up to date" in r.stdout  # only ota_config.json changed
    assert "main.py: the board has one, kept" in r.stdout
    assert (bare_device.fs / "main.py").read_text() == "# the user's application\n"
    assert json.loads((bare_device.fs / "ota_config.json").read_text())["server"] == "http://10.0.0.2:8000"


def test_deploy_refuses_a_board_that_does_not_match(bare_device, repl, keydir, tmp_path):
    r = mpota("deploy", "--port", repl.url, "--pub", keydir / "release.pub", "--server", "http://h:1",
              "--board", "esp32", cwd=tmp_path)
    assert r.returncode == 2
    assert "unix port (the simulator); board esp32 is for esp32" in r.stderr and "--board unix" in r.stderr
    assert not (bare_device.fs / "lib").exists(), "nothing is copied to a board that does not match"


def test_deploy_to_a_port_where_nothing_listens_says_what_to_check(keydir, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = mpota("deploy", "--port", f"socket://127.0.0.1:{port}", "--pub", keydir / "release.pub",
              "--server", "http://h:1", cwd=tmp_path)
    assert r.returncode == 2
    assert "mpremote could not open" in r.stderr and "mpota sim repl" in r.stderr


def test_deploy_needs_a_server_and_a_key(keydir, tmp_path):
    r = mpota("deploy", "--port", "/dev/ttyUSB0", "--pub", keydir / "release.pub", cwd=tmp_path)
    assert r.returncode == 2 and "--server" in r.stderr


def test_dry_run_stages_the_board_architecture_and_prints_the_command(keydir, tmp_path):
    env = dict(os.environ, MPOTA_WIFI_PASSWORD="s3cret")
    r = subprocess.run([MPOTA, "deploy", "--port", "/dev/ttyUSB0", "--pub", str(keydir / "release.pub"),
                        "--server", "http://192.168.1.10:8000", "--board", "esp32c3", "--wifi", "lab",
                        "--dry-run"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "s3cret" not in r.stdout
    stage = tmp_path / "build" / "deploy" / "esp32c3"
    mpys = sorted((stage / "lib" / "ota").glob("*.mpy"))
    assert len(mpys) == len(devicepkg.agent_sources())
    # .mpy v6, as mpy-cross compiles for the board's architecture (the agent has no native code,
    # so the header names no architecture and the bytecode loads on any v6 port).
    ref = {p.name: p.read_bytes() for p in devicepkg.install_agent(tmp_path / "ref", arch="rv32imc")}
    assert {m.name: m.read_bytes() for m in mpys} == ref
    assert {m.read_bytes()[:2] for m in mpys} == {b"M\x06"}
    assert (stage / "main.py").read_bytes() == (ROOT / "device" / "examples" / "main.py").read_bytes()
    assert json.loads((stage / "wifi.json").read_text()) == {"ssid": "lab", "password": "s3cret"}
    assert oct((stage / "wifi.json").stat().st_mode & 0o777) == "0o600"
    assert json.loads((stage / "ota_config.json").read_text())["chip"] == "esp32c3"
    # The command (its exec scripts span lines) is one shell command line:
    cmd = shlex.split(r.stdout[r.stdout.index("\nmpremote ") + 1:])
    assert cmd[:5] == ["mpremote", "connect", "/dev/ttyUSB0", "resume", "exec"]
    stage_rel = stage.relative_to(tmp_path)
    assert " ".join(cmd[6:12]) == f"+ fs cp -r {stage_rel}/lib/ota :lib"
    assert f"+ fs cp {stage_rel}/wifi.json :wifi.json" in " ".join(cmd)
    # the same arguments a real deploy runs (test_deploy_then_the_deployed_agent_updates_the_device)
    assert cmd[3:6] == ["resume", "exec", deploy.CLEAN.format(keep=json.dumps(sorted(m.name for m in mpys)))]


def test_example_main_compiles_for_every_board_arch(tmp_path):
    for arch in ("xtensawin", "rv32imc"):
        devicepkg.compile_file(ROOT / "device" / "examples" / "main.py", tmp_path / f"main-{arch}.mpy", arch)


# ---- the bridge itself, with mpremote by hand ---------------------------------------------------
def test_mpremote_works_through_the_bridge_with_and_without_resume(bare_device, repl):
    (bare_device.fs / "hello.txt").write_text("hi\n")
    r = subprocess.run([MPREMOTE, "connect", repl.url, "resume", "fs", "cat", ":hello.txt"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "hi", r.stdout + r.stderr
    # Without `resume` mpremote soft-resets first: the bridge does what a board does.
    r = subprocess.run([MPREMOTE, "connect", repl.url, "exec", "import os; print(sorted(os.listdir()))",
                        "+", "soft-reset", "+", "exec", "print(7 * 6)"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "['hello.txt']" in r.stdout and "42" in r.stdout
    log = repl.stop()
    assert "soft reset" in log and "connected" in log


def test_repl_is_only_served_on_loopback(bare_device):
    r = mpota("sim", "repl", "dev", "--host", "0.0.0.0", "--port", "0", "--root", bare_device.path.parent)
    assert r.returncode == 2 and "loopback" in r.stderr


# ---- board detection ----------------------------------------------------------------------------
def probe(platform, machine, arch, version=6):
    return deploy.Probe(platform, machine, "1.24.1", version | (deploy.NATIVE_ARCHS.index(arch) << 10))


@pytest.mark.parametrize("machine,arch,board", [
    ("Generic ESP32 module with ESP32", "xtensawin", "esp32"),
    ("Generic ESP32S3 module with ESP32S3", "xtensawin", "esp32s3"),
    ("ESP32C3 module with ESP32C3", "rv32imc", "esp32c3"),
])
def test_the_board_is_found_from_what_micropython_reports(machine, arch, board):
    assert deploy.choose_board(probe("esp32", machine, arch), None) == board


def test_board_detection_refuses_mismatches_with_a_way_out():
    with pytest.raises(deploy.DeployError) as e:
        deploy.choose_board(probe("esp32", "Generic ESP32S3 module with ESP32S3", "xtensawin"), "esp32c3")
    assert e.value.hint == "use --board esp32s3"
    with pytest.raises(deploy.DeployError) as e:
        deploy.choose_board(probe("esp32", "Generic ESP32 module with ESP32", "xtensawin", version=5), None)
    assert ".mpy version 5" in str(e.value) and "--source" in e.value.hint
    assert deploy.choose_board(probe("esp32", "Generic ESP32 module with ESP32", "xtensawin", version=5), None,
                               source=True) == "esp32"
    with pytest.raises(deploy.DeployError) as e:
        deploy.choose_board(probe("rp2", "Raspberry Pi Pico with RP2040", "armv6m"), None)
    assert "ESP32" in str(e.value)


def test_deploy_with_a_config_file_checks_it_is_for_the_board(keydir, tmp_path):
    assert mpota("config", "--pub", keydir / "release.pub", "--server", "http://h:1", "--board", "esp32s3",
                 "--out", tmp_path / "s3.json").returncode == 0
    r = mpota("deploy", "--port", "/dev/ttyUSB0", "--config", tmp_path / "s3.json", "--board", "esp32",
              "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "chip esp32s3" in r.stderr and "--board esp32" in r.stderr
    r = mpota("deploy", "--port", "/dev/ttyUSB0", "--config", tmp_path / "s3.json", "--board", "esp32s3",
              "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    staged = json.loads((tmp_path / "build" / "deploy" / "esp32s3" / "ota_config.json").read_text())
    assert staged == json.loads((tmp_path / "s3.json").read_text())


def test_dry_run_provisions_mirrors_and_aes_keys(keydir, tmp_path):
    from mpota import payload
    payload.generate_aes_key(tmp_path / "fw.aes")
    r = mpota("deploy", "--port", "/dev/ttyUSB0", "--pub", keydir / "release.pub", "--server", "http://a:8000",
              "--mirror", "http://b:8000", "--aes-key", tmp_path / "fw.aes", "--board", "esp32", "--dry-run",
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "build" / "deploy" / "esp32" / "ota_config.json").read_text())
    assert cfg["mirrors"] == ["http://b:8000"]
    assert cfg["aes_keys"] == [payload.load_aes_key(tmp_path / "fw.aes").hex()]
    assert cfg["aes_keys"][0] not in r.stdout  # the key is never printed


def test_a_ca_for_https_travels_with_the_config(keydir, tmp_path):
    # --ca on deploy stages ca.der next to ota_config.json; `mpota config --ca` writes it next to
    # the config, and deploy --config picks it up from there
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deploy CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    der = cert.public_bytes(serialization.Encoding.DER)
    r = mpota("deploy", "--port", "/dev/ttyUSB0", "--pub", keydir / "release.pub", "--server", "https://a:8443",
              "--ca", tmp_path / "ca.pem", "--board", "esp32", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    staged = tmp_path / "build" / "deploy" / "esp32"
    assert json.loads((staged / "ota_config.json").read_text())["ca"] == "ca.der"
    assert (staged / "ca.der").read_bytes() == der
    assert ":ca.der" in r.stdout and "CA for https" in r.stdout
    r = mpota("deploy", "--port", "/dev/ttyUSB0", "--pub", keydir / "release.pub", "--server", "https://a:8443",
              "--board", "esp32", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "--ca" in r.stderr
    out = tmp_path / "cfg" / "ota_config.json"
    out.parent.mkdir()
    r = mpota("config", "--pub", keydir / "release.pub", "--server", "https://a:8443", "--ca", tmp_path / "ca.pem",
              "--out", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out.parent / "ca.der").read_bytes() == der and ":ca.der" in r.stdout
    x509.load_der_x509_certificate((out.parent / "ca.der").read_bytes())
    r = mpota("deploy", "--port", "/dev/ttyUSB0", "--config", out, "--board", "esp32", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (staged / "ca.der").read_bytes() == der
    (out.parent / "ca.der").unlink()
    r = mpota("deploy", "--port", "/dev/ttyUSB0", "--config", out, "--board", "esp32", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "cannot read CA certificate" in r.stderr


def test_a_garbled_answer_from_the_board_is_a_clear_error():
    # noise on a serial line: the probe's answer line cut, not JSON, or with fields of the wrong type
    good = {"platform": "esp32", "machine": "Generic ESP32 module with ESP32", "version": "1.24.1", "mpy": 0x1806}
    assert deploy.parse_probe(deploy._marked("MPOTA-PROBE " + json.dumps(good), "MPOTA-PROBE")).chip == "esp32"
    for out in ['MPOTA-PROBE {"platform": "esp32", "mach', "MPOTA-PROBE [1, 2]", "MPOTA-PROBE \x00\xff"]:
        with pytest.raises(deploy.DeployError) as e:
            deploy._marked(out, "MPOTA-PROBE")
        assert "garbled" in str(e.value)
    for answer in [{**good, "mpy": "6"}, {**good, "platform": None}, {"platform": "esp32"}, {**good, "main": 1}]:
        with pytest.raises(deploy.DeployError) as e:
            deploy.parse_probe(answer)
        assert "probe" in str(e.value) and e.value.hint


def test_stage_never_empties_a_directory_it_did_not_make(keydir, tmp_path):
    mine = tmp_path / "work"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    args = ("deploy", "--port", "/dev/ttyUSB0", "--pub", keydir / "release.pub", "--server", "http://a:8000",
            "--board", "esp32", "--dry-run")
    r = mpota(*args, "--stage", mine, cwd=tmp_path)
    assert r.returncode == 2 and "not a staging directory" in r.stderr and (mine / "notes.txt").exists()
    r = mpota(*args, "--stage", tmp_path / "st", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = mpota(*args, "--stage", tmp_path / "st", cwd=tmp_path)  # its own: emptied and staged again
    assert r.returncode == 0 and ".mpota-stage" not in r.stdout, r.stderr


def test_deploy_names_a_board_that_cannot_roll_back():
    nano = probe("esp32", "Arduino Nano ESP32 with ESP32S3", "xtensawin")
    assert deploy.rollback_warning(nano, {"rollback": None}).startswith("board-confirms: ")
    generic = probe("esp32", "Generic ESP32 module with ESP32", "xtensawin")
    assert deploy.rollback_warning(generic, {"rollback": "bootloader"}) is None
    assert deploy.rollback_warning(generic, {"rollback": "no-rollback"}).startswith("no-rollback: ")
    assert deploy.rollback_warning(None, None) is None


def test_deploy_reports_what_the_agent_learnt_about_rollback(server, firmware, signer, make_device, keydir, tmp_path):
    # a build without CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE: the first update tells the agent so,
    # and the next deploy says it
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url, hardware={"rollback": "off"})
    d.run()
    assert d.status()["rollback"] == "no-rollback"
    repl = SimRepl(d.dev.name, d.dev.path.parent)
    try:
        r = mpota("deploy", "--port", repl.url, "--pub", keydir / "release.pub", "--server", server.url,
                  "--status", "--no-main", cwd=tmp_path)
    finally:
        repl.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deploy: warning: no-rollback: the board's bootloader does not roll back" in r.stdout

def test_deploy_json_summary(bare_device, repl, keydir, tmp_path):
    r = mpota("deploy", "--port", repl.url, "--pub", keydir / "release.pub", "--server", "http://10.0.0.1:8000",
              "--status", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)  # stdout is the JSON alone; the progress is on stderr
    assert "deploy: copying" in r.stderr
    n = len(devicepkg.agent_sources()) + 2
    assert out["board"] == "unix" and out["port"] == repl.url and out["files"] == n and out["copied"] == n
    assert out["status"]["version"] == "1.0.0" and out["status"]["slot"] == "ota_0"
    r = mpota("deploy", "--port", repl.url, "--pub", keydir / "release.pub", "--server", "http://10.0.0.1:8000",
              "--dry-run", "--board", "unix", "--json", "--stage", tmp_path / "dry", cwd=tmp_path)
    out = json.loads(r.stdout)
    assert out["dry_run"] is True and out["command"][:3] == ["mpremote", "connect", repl.url]


def test_the_probe_tells_an_agent_frozen_into_the_firmware_and_nothing_is_copied_then(keydir, tmp_path):
    # A frozen module's __file__ is its name without ".frozen/" (py/builtinimport.c), which is
    # no file on the board's filesystem; an agent in lib/ is. The probe runs in the real
    # micropython, once with each.
    from mpota.sim.runner import micropython_binary
    frozen = tmp_path / "firmware" / "ota"
    frozen.mkdir(parents=True)
    (frozen / "__init__.py").write_text('__file__ = "ota/__init__.py"  # as a frozen module reports it\n')
    lib = tmp_path / "board" / "lib"
    devicepkg.install_agent(lib, arch=None, source=True)

    def probe(path):
        r = subprocess.run([micropython_binary(), "-c", deploy.PROBE], capture_output=True, text=True,
                           cwd=tmp_path / "board", env=dict(os.environ, MICROPYPATH=str(path)), timeout=60)
        return deploy.parse_probe(deploy._marked(r.stdout, "MPOTA-PROBE"))

    assert probe(tmp_path / "firmware").frozen == "ota/__init__.py"
    assert probe(lib).frozen == ""
    cfg = {"server": "http://127.0.0.1:9/", "pubkeys": ["00" * 32]}
    st = deploy.stage(tmp_path / "stage", "esp32", cfg, main=None, frozen=True)
    assert st.agent == [] and not (tmp_path / "stage" / "lib").exists()
    args = deploy.copy_args("socket://127.0.0.1:9", st, status=False, reset=False)
    assert "-r" not in args and ":ota_config.json" in args
    assert 'keep = []' in args[args.index("exec") + 1]  # the shadowed copy in lib/ota is removed
