"""End to end: the real agent on the simulated ESP32 against a real loopback HTTP server."""
from __future__ import annotations

import base64
import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mpota import release


def exits(boots):
    return [b.exit for b in boots]


def test_update_installs_reboots_and_confirms(server, firmware, signer, make_device):
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    boots = d.run()
    # 1.0.0 installs and resets; 2.0.0 passes its health check under the trial watchdog,
    # confirms itself and resets (an ESP32 watchdog cannot be stopped); 2.0.0 runs on.
    assert exits(boots) == ["reset", "reset", "idle"]
    assert [b.version for b in boots] == ["1.0.0", "2.0.0", "2.0.0"]
    st = d.status()
    assert st["version"] == "2.0.0"
    assert st["slot"] == "ota_1"
    assert st["slots"]["ota_1"] == "VALID"
    assert st["last_error"] is None
    assert st["pending"] is None
    # What is in the slot is byte for byte the signed image.
    img = firmware("2.0.0").read_bytes()
    assert d.slot_bytes(1, len(img)) == img
    # One more boot changes nothing: up to date, no download.
    boots = d.run()
    assert exits(boots) == ["idle"]
    assert "up to date" in d.output
    assert d.status()["version"] == "2.0.0"


def test_unhealthy_release_rolls_back_and_is_not_retried(server, firmware, signer, make_device):
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    d.run()
    server.publish(firmware("3.0.0", "unhealthy"), signer)
    boots = d.run()
    assert exits(boots) == ["reset", "reset", "idle"]
    assert [b.version for b in boots] == ["2.0.0", "3.0.0", "2.0.0"]
    st = d.status()
    assert st["version"] == "2.0.0" and st["slot"] == "ota_1"
    assert st["last_error"] == "health-failed"
    assert st["slots"]["ota_0"] == "ABORTED"
    assert st["rejected"] == ["3.0.0"]
    boots = d.run()
    assert exits(boots) == ["idle"]
    assert "installing" not in d.output and "rejected before" in d.output
    assert d.status()["last_error"] == "health-failed"


def test_crash_before_confirm_rolls_back(server, firmware, signer, make_device):
    server.publish(firmware("2.0.0", "crash"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    boots = d.run()
    # the old image boots after a panic reset (reset cause HARD_RESET): evidence against the
    # release, rejected at once
    assert exits(boots) == ["reset", "panic", "idle"]
    st = d.status()
    assert st["version"] == "1.0.0" and st["slot"] == "ota_0"
    assert st["last_error"] == "rolled-back"
    assert "2.0.0 did not confirm itself (a panic or a reset); rejected" in d.output
    assert st["slots"]["ota_1"] == "ABORTED"
    assert st["rejected"] == ["2.0.0"]
    assert exits(d.run()) == ["idle"]
    assert "installing" not in d.output


def test_power_lost_during_a_trial_is_not_held_against_the_release(server, firmware, signer, make_device,
                                                                   tmp_path):
    # The power fails while 2.0.0 runs its trial (its first boot): the bootloader goes back to
    # 1.0.0, which boots with reset cause PWRON_RESET: not the release's fault. It is installed
    # again (from what is still in the slot: nothing is downloaded) and confirmed.
    from mpota.sim import runner
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    d.dev.fs.joinpath("main.py").write_text(
        "import ota, os\n"
        "ota.guard()\n"
        "if ota.status()['version'] == '2.0.0' and 'cut' not in os.listdir():\n"
        "    open('cut', 'w').close()\n"
        "    import flash\n"
        "    flash.flash()._power_loss()\n"  # the power fails during the trial
        "ota.confirm(lambda: True, timeout_ms=3000)\n"
        "ota.update()\n")
    boots = d.run(max_boots=10)
    assert [b.version for b in boots] == ["1.0.0", "2.0.0", "1.0.0"], d.output
    assert boots[1].exit == "power-loss" and boots[2].start == "power-on"
    assert "2.0.0 lost power before it confirmed itself; tried again later" in d.output
    assert "1 more check(s) skip it" not in d.output and "0 more check(s) skip it" in d.output  # back-off
    d.run(max_boots=10)  # the next check installs it again: from the slot, nothing downloaded
    assert "ota: installing" not in d.output and "2.0.0 verified in flash and set to boot" in d.output
    st = d.status()
    assert st["version"] == "2.0.0" and st["rejected"] == [] and st["last_error"] is None, d.output
    assert runner.read_state(d.dev).get("trials") is None


def test_health_check_exception_and_timeout_roll_back(server, firmware, signer, make_device):
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    main = d.dev.fs / "main.py"
    main.write_text("import ota\n"
                    "def health():\n"
                    "    raise RuntimeError('sensor bus stuck')\n"
                    "ota.confirm(health, timeout_ms=1000)\nota.update()\n")
    d.run()
    st = d.status()
    assert st["version"] == "1.0.0" and st["last_error"] == "health-exception"
    assert "sensor bus stuck" in d.output

    assert st["rejected"] == ["2.0.0"]  # the check said no: rejected at once

    # A check that never decides (the network may be down): not held against the release. It
    # is tried again, each time after more checks (1, 3, 7, 15: back-off), and rejected only
    # after the fifth such trial, so a broken image cannot keep the board resetting. The
    # application here checks 20 times per boot.
    server.publish(firmware("2.1.0"), signer)
    main.write_text("import ota\n"
                    "ota.confirm(lambda: None, timeout_ms=300)\n"
                    "for i in range(20):\n"
                    "    r = ota.update()\n"
                    "print('checks done', r)\n")
    boots = d.run(max_boots=14)
    assert [b.version for b in boots] == ["1.0.0", "2.1.0"] * 5 + ["1.0.0"], d.output
    assert d.output.count("its health check never decided") == 4
    assert d.output.count("ota: installing 2.1.0") == 1  # the image stays in its slot
    assert "failed 4 time(s) in a row (last: health-timeout); 14 more check(s) skip it" in d.output, d.output
    st = d.status()
    assert st["version"] == "1.0.0" and st["last_error"] == "health-timeout"
    assert st["rejected"] == ["2.0.0", "2.1.0"]


def test_works_with_a_server_that_ignores_range(tmp_path, firmware, signer, make_device):
    # Python's http.server: no Range, HTTP/1.0, no ETag. Any static server must do.
    root = tmp_path / "static"
    release.build(firmware("2.0.0"), root, [signer])
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        d = make_device(firmware("1.0.0"), "http://127.0.0.1:%d/" % httpd.server_address[1])
        d.run()
        assert d.status()["version"] == "2.0.0"
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---- refusals: each bad release gets its own code and the old firmware keeps running --------

def _tamper(server, firmware, signer, foreign):
    server.publish(firmware("2.0.0"), signer)
    p = server.root / firmware("2.0.0").name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(data)


def _tamper_header(server, firmware, signer, foreign):
    # Whoever serves the payload breaks its first block (magic byte, then the chip id): that is
    # the server's doing, not the release's, and the signed hash is what tells the two apart.
    # A refusal that blamed the release (bad-image, wrong-chip) would count against it in a
    # rollout (docs/rollout.md), so a hostile mirror could halt any rollout.
    server.publish(firmware("2.0.0"), signer)
    p = server.root / firmware("2.0.0").name
    data = bytearray(p.read_bytes())
    data[0] = 0x00
    p.write_bytes(data)


def _tamper_chip_id(server, firmware, signer, foreign):
    server.publish(firmware("2.0.0"), signer)
    p = server.root / firmware("2.0.0").name
    data = bytearray(p.read_bytes())
    data[12] ^= 0x09  # esp_image_header_t.chip_id (uint16 at offset 12)
    p.write_bytes(data)


def _foreign_key(server, firmware, signer, foreign):
    server.publish(firmware("2.0.0"), foreign)


def _bad_signature(server, firmware, signer, foreign):
    server.publish(firmware("2.0.0"), signer)
    env = json.loads((server.root / "manifest.json").read_bytes())
    body = json.loads(base64.b64decode(env["payload"]))
    body["security_counter"] = 7  # changed after signing
    env["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
    (server.root / "manifest.json").write_text(json.dumps(env))


def _downgrade(server, firmware, signer, foreign):
    server.publish(firmware("0.9.0"), signer)


def _wrong_chip(server, firmware, signer, foreign):
    server.publish(firmware("2.0.0", chip="esp32s3"), signer)


def _signed_over(server, firmware, signer, img: bytes):
    # The 2.0.0 release's manifest, signed again over `img` as its image and payload: whatever
    # is wrong with img is then the release's own mistake, not the server's.
    rel = server.publish(firmware("2.0.0"), signer)
    (server.root / rel.manifest["payload"]["url"]).write_bytes(img)
    m = dict(rel.manifest)
    digest = __import__("hashlib").sha256(img).hexdigest()
    m["image"] = {"size": len(img), "sha256": digest}
    m["payload"] = dict(m["payload"], size=len(img), sha256=digest)
    server.write_manifest_body(m, signer)


def _wrong_chip_in_image(server, firmware, signer, foreign):
    # A correctly signed manifest for chip esp32 whose image header says ESP32-S3.
    img = firmware("2.0.0", chip="esp32s3").read_bytes()
    from mpota.espimage import parse
    assert parse(img).chip == "esp32s3"
    _signed_over(server, firmware, signer, img)


def _truncated(server, firmware, signer, foreign):
    server.publish(firmware("2.0.0"), signer)
    p = server.root / firmware("2.0.0").name
    p.write_bytes(p.read_bytes()[:-1000])


def _too_long(server, firmware, signer, foreign):
    server.publish(firmware("2.0.0"), signer)
    p = server.root / firmware("2.0.0").name
    p.write_bytes(p.read_bytes() + b"\0" * 16)


def _mixed_releases(server, firmware, signer, foreign):
    # manifest of 2.0.0, payload file of 2.1.0 under the same name (same size): the server's
    # mix-up, which the signed hash shows
    server.publish(firmware("2.0.0"), signer)
    (server.root / firmware("2.0.0").name).write_bytes(firmware("2.1.0").read_bytes())


def _mixed_releases_signed(server, firmware, signer, foreign):
    # a manifest for 2.0.0 signed over the image of 2.1.0: the release's own mistake
    _signed_over(server, firmware, signer, firmware("2.1.0").read_bytes())


def _garbage_manifest(server, firmware, signer, foreign):
    (server.root / "manifest.json").write_bytes(bytes(range(256)) * 4)


def _oversized_manifest(server, firmware, signer, foreign):
    server.publish(firmware("2.0.0"), signer)
    env = json.loads((server.root / "manifest.json").read_bytes())
    env["padding"] = "x" * 65536
    (server.root / "manifest.json").write_text(json.dumps(env))


def _unknown_critical(server, firmware, signer, foreign):
    rel = server.publish(firmware("2.0.0"), signer)
    server.write_manifest_body(dict(rel.manifest, critical=["delta-base"]), signer)


def _wrong_board(server, firmware, signer, foreign):
    server.publish(firmware("2.0.0"), signer, board="esp32-cam")


def _security_counter(server, firmware, signer, foreign):
    rel = server.publish(firmware("2.0.0"), signer)
    server.write_manifest_body(dict(rel.manifest, security_counter=-1), signer)


def _not_json_body(server, firmware, signer, foreign):
    server.write_manifest_body(b"\xff not json", signer)


def _missing_payload(server, firmware, signer, foreign):
    server.publish(firmware("2.0.0"), signer)
    (server.root / firmware("2.0.0").name).unlink()


REFUSALS = [
    ("tampered payload", _tamper, "hash-mismatch"),
    ("payload's magic byte tampered in transit", _tamper_header, "hash-mismatch"),
    ("payload's chip id tampered in transit", _tamper_chip_id, "hash-mismatch"),
    ("foreign key", _foreign_key, "unknown-key"),
    ("manifest changed after signing", _bad_signature, "bad-signature"),
    ("downgrade", _downgrade, "downgrade"),
    ("wrong chip", _wrong_chip, "wrong-chip"),
    ("wrong chip in the image header", _wrong_chip_in_image, "wrong-chip"),
    ("truncated payload", _truncated, "truncated"),
    ("payload longer than declared", _too_long, "too-long"),
    ("manifest and payload from different releases", _mixed_releases, "hash-mismatch"),
    ("a release signed over another release's image", _mixed_releases_signed, "version-mismatch"),
    ("garbage manifest", _garbage_manifest, "bad-envelope"),
    ("oversized manifest", _oversized_manifest, "manifest-too-large"),
    ("unknown critical field", _unknown_critical, "unsupported-critical"),
    ("wrong board", _wrong_board, "wrong-board"),
    ("malformed security counter", _security_counter, "bad-manifest"),
    ("signed body is not JSON", _not_json_body, "bad-manifest"),
    ("payload missing on the server", _missing_payload, "http-404"),
]


@pytest.mark.parametrize("case,setup,code", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_with_its_code_and_old_firmware_keeps_running(case, setup, code, server, firmware,
                                                               signer, keydir, make_device):
    from mpota import keys
    d = make_device(firmware("1.0.0"), server.url)
    otadata_before = d.otadata()
    setup(server, firmware, signer, keys.load_private(keydir / "foreign"))
    boots = d.run()
    assert exits(boots) == ["idle"], d.output
    st = d.status()
    assert st["last_error"] == code, d.output
    assert st["version"] == "1.0.0" and st["slot"] == "ota_0"
    assert st["pending"] is None
    assert d.otadata() == otadata_before  # nothing was set to boot
    # No half-written image is left where a bootloader could find it.
    assert d.slot_bytes(1, 1) == b"\xff"
    # The running image is untouched.
    img = firmware("1.0.0").read_bytes()
    assert d.slot_bytes(0, len(img)) == img


def test_check_reports_without_changing_anything(server, firmware, signer, make_device):
    from mpota.sim import runner
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url)

    def check():
        env = runner.device_env(d.dev, MPOTA_RUNNING=d.status()["slot"])
        rc, out = runner.run_micropython(d.dev, ["-c", "import ota, json; print(json.dumps(ota.check()))"],
                                         env, "128K")
        assert rc == 0, out
        return json.loads(out.strip().splitlines()[-1])

    before = d.flash()
    assert check() == {"update": True, "version": "2.0.0", "running": "1.0.0", "error": None, "detail": ""}
    assert d.flash() == before
    d.run()
    assert check()["update"] is False and check()["detail"] == "up to date"
    server.publish(firmware("1.5.0"), signer)
    assert check()["error"] == "downgrade"
    # too little heap for the signature check: an answer, not an exception in the application
    env = runner.device_env(d.dev, MPOTA_RUNNING=d.status()["slot"])
    rc, out = runner.run_micropython(d.dev, ["-c", "import ota, json; print(json.dumps(ota.check()))"], env, "40K")
    assert rc == 0 and json.loads(out.strip().splitlines()[-1])["error"] == "no-memory", out


def test_update_refuses_to_run_before_the_new_image_is_confirmed(server, firmware, signer, make_device):
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    d.dev.fs.joinpath("main.py").write_text(
        "import ota\nif ota.status()['version'] == '1.0.0':\n    ota.update()\n"
        "else:\n    print(ota.update())\n")
    server_has_3 = server.publish(firmware("3.0.0"), signer)
    assert server_has_3.manifest["version"] == "3.0.0"
    boots = d.run(max_boots=4)
    assert "not-confirmed" in boots[-1].output or "not-confirmed" in d.output
    # it never confirmed, so the next reset rolls it back; 1.0.0 remains intact in ota_0
    img = firmware("1.0.0").read_bytes()
    assert d.slot_bytes(0, len(img)) == img


def test_a_large_image_streams_within_an_esp32_heap(server, firmware, signer, make_device):
    # 1 MiB through a 128 KiB heap (which in the simulator also holds the ~12 KiB emulated
    # esp32 module): only possible if nothing holds the payload.
    big = firmware("2.0.0", size=1024 * 1024)
    server.publish(big, signer)
    d = make_device(firmware("1.0.0"), server.url, heap="128K")
    assert all(p.suffix == ".mpy" for p in (d.dev.fs / "lib" / "ota").iterdir())
    d.run()
    st = d.status()
    assert st["version"] == "2.0.0" and st["last_error"] is None, d.output
    assert d.slot_bytes(1, len(big.read_bytes())) == big.read_bytes()


def test_confirm_checks_its_arguments_and_api_calls_repeat(firmware, make_device, server):
    # not only on a new image's first boot, where a mistake would roll back the first field update
    from mpota.sim import runner
    d = make_device(firmware("1.0.0"), server.url)
    runner.ensure_running(d.dev)
    env = runner.device_env(d.dev, MPOTA_RUNNING=d.dev.running["slot"], MPOTA_BEHAVIOR="healthy")
    script = """
import ota
for args in ((5,), (lambda: True, '30000'), (lambda: True, 0)):
    try:
        ota.confirm(*args)
        print('accepted', args)
    except (TypeError, ValueError) as e:
        print(type(e).__name__)
ota.confirm(lambda: True, 1000)
ota.status()
print(ota.status()['version'])  # every API function can be called again (none is shadowed)
"""
    rc, out = runner.run_micropython(d.dev, ["-c", script], env, d.dev.heap)
    assert rc == 0 and out.split() == ["TypeError", "ValueError", "ValueError", "1.0.0"], out


def test_the_application_gets_its_heap_back(server, firmware, signer, make_device):
    # An update check loads tens of KiB of agent code; each API call forgets what it loaded, so a
    # main.py that checks every hour does not lose that heap for good. Too little heap to load
    # the updater is an answer (no-memory), not an exception in the application.
    from mpota.sim import runner
    server.publish(firmware("1.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    runner.ensure_running(d.dev)
    env = runner.device_env(d.dev, MPOTA_RUNNING=d.dev.running["slot"])
    script = """
import gc, ota, sys
ota.confirm(lambda: True)
held = []
for i in range(3):
    gc.collect(); a = gc.mem_alloc()
    r = ota.update(); c = ota.check(); s = ota.status()
    gc.collect(); held.append(gc.mem_alloc() - a)
print(r['result'], c['detail'], s['version'], held, sorted(k for k in sys.modules if k.startswith('ota')))
"""
    rc, out = runner.run_micropython(d.dev, ["-c", script], env, "128K")
    assert rc == 0, out
    line = out.strip().splitlines()[-1]
    assert line.startswith("up-to-date up to date 1.0.0"), line
    held = json.loads(line[line.index("["):line.index("]") + 1])
    # the first round keeps only the native SHA-512 code (machine code: never reloaded), then nothing
    assert held[0] < 12 * 1024 and held[1] < 512 and held[2] < 512, held
    assert line.endswith("['ota', 'ota._sha512_viper']"), line
    rc, out = runner.run_micropython(d.dev, ["-c", "import ota\nprint(ota.update()['error'])"], env, "44K")
    assert rc == 0 and out.strip().splitlines()[-1] == "no-memory", out
    assert d.status()["last_error"] == "no-memory"


def test_a_filesystem_that_cannot_be_written_installs_nothing_and_crashes_nothing(server, firmware, signer,
                                                                                   make_device):
    # a full or broken filesystem: the state file cannot be written (here: directories sit where its
    # two copies go). Nothing is set to boot that could not be recorded, and main.py
    # keeps running: no reset loop, no download repeated on every boot.
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    for name in ("ota_state.0.json", "ota_state.1.json"):
        (d.dev.fs / name).mkdir()
    d.run(max_boots=2)
    assert "state-unwritable" in d.output and "Traceback" not in d.output, d.output
    assert d.dev.running["version"] == "1.0.0"
    assert "[boot 1] idle" in d.output and "[boot 2]" not in d.output  # idle after the first boot


def test_a_failed_health_check_rolls_back_even_if_nothing_can_be_recorded(server, firmware, signer, make_device):
    # the filesystem fails between the install and the new image's first boot: the unhealthy
    # image still resets into the old one (it must not stay up, unconfirmed, because a state
    # write failed), and the old one runs its application
    from mpota.sim import runner
    server.publish(firmware("2.0.0", "unhealthy"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    with pytest.raises(AssertionError):
        d.run(max_boots=1)  # installs 2.0.0 and resets
    # the copy the next save writes (the older one) cannot be written: a directory sits there
    older = runner.STATE_FILES[(d.state()["gen"] + 1) % 2]
    (d.dev.fs / older).unlink(missing_ok=True)
    (d.dev.fs / older).mkdir()
    d.run(max_boots=6)  # ends idle (an AssertionError with the boot log otherwise)
    assert "health check failed" in d.output and "state-unwritable" in d.output, d.output
    assert runner.ensure_running(d.dev)["version"] == "1.0.0", d.output
    assert "Traceback" not in d.output
