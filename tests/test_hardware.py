"""Hardware truth: the simulated ESP32 does what a real one does (ESP-IDF v5.2.2's bootloader and
esp_ota_ops.c, MicroPython v1.25's ports/esp32; docs/simulator.md names each source function),
and the agent stays safe on it.

- No reset comes by itself: an uncaught exception leaves the board at the REPL, a hang stays a
  hang; only an armed machine.WDT (or a power cycle) resets it. The agent arms one on a trial boot.
- machine.soft_reset() and a wake from deep sleep skip the bootloader's otadata step.
- set_boot() (esp_image_verify) checks the chip revision; a release it refuses is not fetched again.
- Bootloaders without rollback and boards that confirm every image at start-up.
"""
from __future__ import annotations

import json

import pytest

from conftest import otadata_record
from mpota.sim import runner

WDT_MS = 1500  # the trial watchdog in these tests (the default is 60 s)


def exits(boots):
    return [b.exit for b in boots]


def versions(boots):
    return [b.version for b in boots]


@pytest.fixture
def device(server, firmware, signer, make_device):
    """A device on 1.0.0 with a short trial watchdog, and a server that will offer `new`."""
    def make(new_behavior="healthy", main=None, **hw):
        server.publish(firmware("2.0.0", new_behavior), signer)
        d = make_device(firmware("1.0.0"), server.url, hardware=hw or None)
        d.config(watchdog_ms=WDT_MS)
        if main is not None:
            (d.dev.fs / "main.py").write_text(main)
        return d
    return make


def on_device(d, code, **env):
    runner.ensure_running(d.dev)
    e = runner.firmware_env(d.dev, d.dev.running, **env)
    rc, out = runner.run_micropython(d.dev, ["-c", code], e, d.dev.heap, timeout=30)
    assert rc == 0, out
    return out


# ---- 1. no reset comes by itself --------------------------------------------------------------

# main.py without the agent's guard: what a board does when nothing arms a watchdog
UNGUARDED = ("import ota, firmware\n"
             "firmware.init()\n"
             "ota.confirm(lambda: firmware.selftest(), timeout_ms=3000)\n"
             "ota.update()\n")


def test_an_exception_before_confirm_leaves_the_board_at_the_repl(device):
    # As the real v1.25.0 firmware in QEMU does: no reset, the record stays PENDING_VERIFY.
    d = device("raise", main=UNGUARDED)
    boots = d.run()
    assert exits(boots) == ["reset", "repl"], d.output
    assert versions(boots) == ["1.0.0", "2.0.0"]
    assert "RuntimeError: driver init failed" in d.output
    assert d.status()["slots"]["ota_1"] == "PENDING_VERIFY"
    # a person cycles the power: the bootloader aborts the trial and boots 1.0.0 again. To the
    # agent that is power lost during a trial (reset cause PWRON_RESET): not held against the
    # release, it is tried again later, with back-off
    boots = d.run()
    assert versions(boots)[0] == "1.0.0", d.output
    assert "2.0.0 lost power before it confirmed itself; tried again later" in boots[0].output
    st = d.status()
    assert st["slots"]["ota_1"] == "ABORTED" and st["rejected"] == []


def test_a_hang_with_no_watchdog_is_reported_as_hung(device):
    d = device("hang", main=UNGUARDED)
    boots = d.run(hang_s=4)
    assert exits(boots) == ["reset", "hung"], d.output
    assert "hung: no progress for 4 s and no watchdog armed" in d.output


@pytest.mark.parametrize("behavior,what", [
    ("raise", "an exception before confirm()"),
    ("hang", "a hang before confirm()"),
    ("stuck", "a health check that never returns"),
])
def test_a_new_image_that_fails_before_confirming_comes_back_by_itself(behavior, what, device):
    d = device(behavior)  # the default main.py: ota.guard(), firmware.init(), ota.confirm(health)
    boots = d.run(max_boots=10, hang_s=60)
    # 2.0.0 fails, the watchdog resets, the bootloader rolls back; 1.0.0 boots with reset cause
    # WDT_RESET: evidence against the release, rejected at once
    assert exits(boots) == ["reset", "watchdog", "idle"], d.output
    assert versions(boots) == ["1.0.0", "2.0.0", "1.0.0"]
    assert [b.start for b in boots][2] == "watchdog"
    assert "2.0.0 did not confirm itself (a watchdog reset); rejected" in d.output
    st = d.status()
    assert st["version"] == "1.0.0" and st["last_error"] == "rolled-back", what
    assert st["rejected"] == ["2.0.0"] and st["slots"]["ota_1"] == "ABORTED"
    assert "installing" not in d.run()[0].output  # never again


def test_an_application_that_confirmed_is_not_reset_by_the_agent(device):
    # It runs for twice the trial watchdog's timeout without feeding anything.
    main = ("import ota, firmware, time\n"
            "ota.guard()\n"
            "ota.confirm(lambda: firmware.selftest(), timeout_ms=3000)\n"
            "ota.update()\n"
            "time.sleep_ms(%d)\n"
            "print('application ran on')\n" % (2 * WDT_MS))
    d = device(main=main)
    boots = d.run(hang_s=60)
    assert exits(boots) == ["reset", "reset", "idle"], d.output
    assert "trial's watchdog is disarmed" in boots[1].output
    assert "application ran on" in boots[2].output
    assert d.status()["slots"]["ota_1"] == "VALID"


def test_the_watchdog_model(device, tmp_path):
    # machine.WDT: armed, not fed -> reset (reset_cause WDT_RESET); a second WDT() changes the
    # timeout; a soft reset does not disarm it (ports/esp32/machine_wdt.c, main.c).
    main = ("import machine, os\n"
            "print('cause', machine.reset_cause())\n"
            "if not 'step' in os.listdir():\n"
            "    open('step', 'w').write('1')\n"
            "    w = machine.WDT(timeout=60000)\n"
            "    w = machine.WDT(timeout=800)\n"  # reconfigured
            "    machine.soft_reset()\n"
            "elif open('step').read() == '1':\n"
            "    open('step', 'w').write('2')\n"
            "    while True: pass\n"  # still armed after the soft reset: the watchdog ends this
            "else:\n"
            "    print('done')\n")
    d = device(main=main)
    boots = d.run(hang_s=30)
    assert exits(boots) == ["soft-reset", "watchdog", "idle"], d.output
    assert [b.start for b in boots] == ["power-on", "soft-reset", "watchdog"]
    causes = [int(b.output.split("cause ")[1].split()[0]) for b in boots]
    assert causes == [1, 5, 3]  # PWRON_RESET, SOFT_RESET, WDT_RESET


# ---- 2. restarts that skip the bootloader -----------------------------------------------------

TWICE = ("import ota, machine, os\n"
         "ota.confirm()\n"
         "n = len([f for f in os.listdir() if f == 'step'])\n"
         "if not n:\n"
         "    open('step', 'w').write('x')\n"
         "    print('first', ota.update(reboot=False))\n"
         "    machine.%s\n"
         "else:\n"
         "    os.remove('step')\n"
         "    print('second', ota.update(reboot=False))\n")


@pytest.mark.parametrize("how,start", [("soft_reset()", "soft-reset"), ("deepsleep(10)", "deep-sleep wake")])
def test_a_second_update_before_the_bootloader_ran_writes_nothing(how, start, device, server, firmware, signer):
    # update(reboot=False), then a restart that skips the bootloader's otadata step: the old
    # image runs again with our NEW record pending. A second update() must not write the slot
    # or a second record (with the same sequence number, over the last good one).
    d = device(main=TWICE % how)
    server.publish(firmware("3.0.0"), signer)  # a newer release is out meanwhile
    boots = d.run()
    assert exits(boots)[:1] == [how.split("(")[0].replace("_", "-").replace("deepsleep", "deep-sleep")]
    assert [b.start for b in boots][:2] == ["power-on", start]
    assert versions(boots)[:2] == ["1.0.0", "1.0.0"], d.output
    assert "'result': 'installed'" in boots[0].output
    assert "reboot-pending" in boots[1].output
    od = d.otadata()
    assert od[:32] == otadata_record(1, 2)          # the last good record, untouched
    assert od[0x1000:0x1020] == otadata_record(2, 0)  # one NEW record, for ota_1
    # the next reset boots what was installed
    boots = d.run()
    assert versions(boots)[0] == "3.0.0" and d.status()["slots"]["ota_1"] in ("VALID", "PENDING_VERIFY")


def test_update_with_reboot_finishes_a_pending_install(device):
    main = ("import ota, machine, os\n"
            "ota.confirm()\n"
            "if 'x' not in os.listdir():\n"
            "    open('x', 'w').close()\n"
            "    ota.update(reboot=False)\n"
            "    machine.soft_reset()\n"
            "ota.update()\n")
    d = device(main=main)
    boots = d.run()
    assert exits(boots)[:2] == ["soft-reset", "reset"], d.output
    assert "boots at the next reset; resetting" in boots[1].output
    assert versions(boots)[2] == "2.0.0"
    assert d.output.count("ota: installing") == 1


def test_a_deep_sleep_wake_boots_the_last_slot_without_reading_otadata(device):
    # CONFIG_BOOTLOADER_SKIP_VALIDATE_IN_DEEP_SLEEP: after set_boot() the wake still boots the
    # old image, and the record stays NEW (esp32.rst: "Do not enter deepsleep after changing
    # the OTA boot partition, without first performing a hard reset")
    main = ("import ota, machine, os\n"
            "if 'slept' not in os.listdir():\n"
            "    open('slept', 'w').close()\n"
            "    ota.update(reboot=False)\n"
            "    machine.deepsleep(10)\n"
            "print('awake', machine.reset_cause(), ota.status()['slots'])\n")
    d = device(main=main)
    boots = d.run()
    assert [b.start for b in boots] == ["power-on", "deep-sleep wake"]
    assert versions(boots) == ["1.0.0", "1.0.0"]
    assert "awake 4 {'ota_0': 'VALID', 'ota_1': 'NEW'}" in boots[1].output  # DEEPSLEEP_RESET


def test_the_first_boot_after_flashing_writes_the_first_record(firmware, make_device):
    # make_device powered the new device on once: otadata was blank (as esptool leaves it), so
    # set_actual_ota_seq() wrote {seq 1, VALID} to sector 0
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/")
    assert d.otadata()[:32] == otadata_record(1, 2)
    assert d.otadata()[0x1000:0x1020] == b"\xff" * 32
    assert d.status()["slots"] == {"ota_0": "VALID", "ota_1": "UNDEFINED"}


# ---- 3. what set_boot() checks, and a refusal that is not retried ----------------------------

def test_set_boot_refuses_an_image_for_another_chip_revision_once(server, firmware, signer, make_device, tmp_path):
    from mpota import espimage
    img = tmp_path / "fw-2.0.0-rev.bin"
    img.write_bytes(espimage.build_sim_firmware("2.0.0", max_rev=299))  # up to v2.99; the chip is v3.0
    server.publish(img, signer)
    d = make_device(firmware("1.0.0"), server.url)
    # an hour of checks, one a minute: the slot is written once, then the release is rejected
    (d.dev.fs / "main.py").write_text("import ota\nota.confirm()\nfor i in range(60):\n    ota.update()\n")
    cut = runner.PowerCut(None, ops_file=tmp_path / "ops")
    boots = d.run(cut=cut)
    assert exits(boots) == ["idle"], d.output
    st = d.status()
    assert st["last_error"] == "set-boot-failed" and st["rejected"] == ["2.0.0"], st
    assert d.output.count("ota: installing") == 1
    blocks = (img.stat().st_size + 4095) // 4096
    assert cut.erases <= blocks + 3, cut.erases  # one install (and the otadata sector), not 60
    assert st["version"] == "1.0.0" and st["slots"]["ota_1"] == "UNDEFINED"


def test_the_simulated_set_boot_checks_chip_id_and_revision(firmware, make_device, tmp_path):
    from mpota import espimage
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/", hardware={"chip_rev": 301})
    cases = {"ok": dict(), "min above": dict(min_rev=302), "max below": dict(max_rev=300),
             "max unset (0)": dict(max_rev=0), "min equal": dict(min_rev=301)}
    got = {}
    for name, kw in cases.items():
        flash = bytearray(d.flash())
        img = espimage.build_sim_firmware("2.0.0", **kw)
        flash[0x190000:0x190000 + 0x40000] = b"\xff" * 0x40000
        flash[0x190000:0x190000 + len(img)] = img
        d.dev.flash.write_bytes(flash)
        out = on_device(d, "import esp32\ntry:\n esp32.Partition('ota_1').set_boot(); print('ok')\n"
                           "except OSError as e:\n print('refused', e.args[0])")
        got[name] = out.strip().splitlines()[-1]
    assert got == {"ok": "ok", "min above": "refused -5379", "max below": "refused -5379",
                   "max unset (0)": "ok", "min equal": "ok"}


# ---- 4. boards that do not roll back by themselves --------------------------------------------

@pytest.mark.parametrize("hw,code", [({"rollback": "off"}, "no-rollback"),
                                     ({"rollback": "bootloader-off"}, "no-rollback"),
                                     ({"board_confirms": True}, "board-confirms")])
def test_a_board_without_bootloader_rollback_is_named_and_rolled_back_by_the_agent(hw, code, device, server,
                                                                                  firmware, signer):
    d = device(**hw)
    boots = d.run()
    assert versions(boots) == ["1.0.0", "2.0.0", "2.0.0"], d.output
    st = d.status()
    assert st["version"] == "2.0.0" and st["rollback"] == code and st["last_error"] is None
    assert f"warning: {code}" in d.output
    # a release that fails its health check: the agent sets the old slot to boot itself
    server.publish(firmware("3.0.0", "unhealthy"), signer)
    boots = d.run()
    assert versions(boots) == ["2.0.0", "3.0.0", "2.0.0"], d.output
    st = d.status()
    assert st["version"] == "2.0.0" and st["last_error"] == "health-failed" and st["rejected"] == ["3.0.0"]


@pytest.mark.parametrize("hw", [{"rollback": "off"}, {"board_confirms": True}])
def test_a_crash_loop_on_a_board_without_rollback_ends_on_the_old_image(hw, device):
    # the watchdog resets into the same image (nothing aborts it); its second start rolls back
    d = device("raise", **hw)
    boots = d.run(max_boots=12, hang_s=60)
    assert versions(boots)[-1] == "1.0.0" and exits(boots)[-1] == "idle", d.output
    assert "started again without being confirmed; rolling back" in d.output
    st = d.status()
    assert st["version"] == "1.0.0" and st["rejected"] == ["2.0.0"]


def test_status_says_nothing_about_rollback_before_the_first_update(firmware, make_device):
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/")
    assert d.status()["rollback"] is None
    out = json.loads(on_device(d, "import ota, json\nprint(json.dumps(ota.guard()))").strip().splitlines()[-1])
    assert out is None  # not a trial boot: nothing armed
