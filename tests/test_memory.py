"""Memory is a budget (issue 14): a signed 1.5 MiB update completes at the published heap floor
(raw, compressed and encrypted payloads), and below what it needs it is an answer (no-memory)
with the running firmware and the device's state intact. Sizes, not times: `make bench` prints
the smallest heap each payload kind needs."""
from __future__ import annotations

import pytest

from mpota import payload
from mpota.sim import runner
from mpota.sim.device import HEAP_FLOOR

SIZE = 1536 * 1024
KINDS = {"raw": {}, "compressed": {"compress": True}, "encrypted": {"aes": True}}


def publish(kind, server, firmware, signer, tmp_path):
    # A signed 1.5 MiB release of this payload kind on the server; returns the AES key file a
    # device needs for it (made for every kind, so that every device is provisioned alike).
    aes = tmp_path / "fw.aes"
    payload.generate_aes_key(aes)
    kw = dict(KINDS[kind])
    if kw.pop("aes", False):
        kw["aes_key"] = payload.load_aes_key(aes)
    server.publish(firmware("2.0.0", size=SIZE), signer, **kw)
    return aes


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_1_5_mib_update_completes_at_the_published_heap_floor(kind, server, firmware, signer, make_device,
                                                                 tmp_path):
    aes = publish(kind, server, firmware, signer, tmp_path)
    d = make_device(firmware("1.0.0"), server.url, heap=HEAP_FLOOR, aes_keys=[aes])
    d.run()
    st = d.status()
    assert (st["version"], st["last_error"]) == ("2.0.0", None), d.output


# The heap ota.update() itself needs, as `make bench` measures it (a main.py that only updates:
# no application beside it): 63-64 KiB for each payload kind, issue 14's target of 64 KiB
# (docs/memory.md); checked here 4 KiB above it, for the heap's layout, which moves the
# smallest heap by a KiB or two.
UPDATE_HEAP = "68K"


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_1_5_mib_update_alone_completes_in_68k(kind, server, firmware, signer, make_device, tmp_path):
    aes = publish(kind, server, firmware, signer, tmp_path)
    d = make_device(firmware("1.0.0"), server.url, aes_keys=[aes])
    (d.dev.fs / "main.py").write_text("import ota\nprint(ota.update())\n")
    d.run(heap=UPDATE_HEAP)  # installs, resets into 2.0.0 (on trial: this main.py confirms nothing)
    assert "set to boot" in d.output and "MemoryError" not in d.output, d.output
    assert d.status()["version"] == "2.0.0", d.output


def test_below_its_floor_an_update_is_no_memory_and_changes_nothing(server, firmware, signer, make_device):
    server.publish(firmware("2.0.0", size=SIZE), signer, compress=True)
    d = make_device(firmware("1.0.0"), server.url)
    slots = d.status()["slots"]
    main = d.dev.fs / "main.py"
    usual = main.read_text()
    main.write_text("import ota\nprint(ota.update())\n")
    d.run(heap="56K")  # the updater's code loads; the heap runs out later, wherever it does
    st = d.status()
    assert (st["version"], st["last_error"]) == ("1.0.0", "no-memory"), d.output
    assert st["slots"] == slots  # nothing set to boot
    assert "{'error': 'no-memory'" in d.output and "Traceback" not in d.output.split("no-memory")[-1], d.output
    main.write_text(usual)
    d.run()  # with its usual heap the next check installs it: no-memory is not held against it
    assert d.status()["version"] == "2.0.0", d.output


def test_the_emulated_partition_constructor_takes_what_esp32_partition_c_takes(firmware, make_device):
    # esp32_partition_make_new(): positional arguments only; block_size is a uint16_t (65536
    # wraps to 0, and ioctl(6) then refuses: -EINVAL); an unknown label is OSError(ENOENT)
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/")
    code = ("import esp32\nout = []\n"
            "try:\n esp32.Partition('ota_1', block_size=65536)\nexcept TypeError:\n out.append('TypeError')\n"
            "p = esp32.Partition('ota_1', 65536)\nout.append((p.ioctl(5, None), p.ioctl(6, 0)))\n"
            "try:\n esp32.Partition('nope')\nexcept OSError as e:\n out.append(e.errno)\n"
            "print(out)\n")
    env = runner.device_env(d.dev, MPOTA_RUNNING="ota_0")
    rc, out = runner.run_micropython(d.dev, ["-c", code], env, "128K")
    assert rc == 0 and out.strip().splitlines()[-1] == "['TypeError', (0, -22), 2]", out


def test_with_a_rollout_role_the_1_5_mib_update_still_completes_at_the_floor(server, firmware, signer, make_device,
                                                                            tmp_path, monkeypatch):
    # docs/rollout.md: the rollout document is checked (a second Ed25519 verification) and judged
    # in the manifest stage. The largest document a device takes (64 targets, 40 excluded, 16
    # stages, a window: about 3.6 KB), NTP, groups and a window of the device's own.
    import hashlib
    import time
    from mpota import deviceconfig, keys, rolloutdoc
    server.publish(firmware("2.0.0", size=SIZE), signer)
    keys.generate(tmp_path / "rollout")
    env = hashlib.sha256((server.root / "manifest.json").read_bytes()).hexdigest()
    now = int(time.time())
    always = {"cron": "*/5 * * * *", "duration_s": 86400, "utc_offset_min": 60, "jitter_s": 0}
    body = rolloutdoc.build(env, "2.0.0", "heap", now - 60, now + 86400,
                            [{"at": now - 76 + i, "share_bp": 10000} for i in range(16)],
                            targets={"boards": ["esp32", "unix"], "groups": ["g%02d" % i for i in range(30)],
                                     "devices": ["dev"] + ["d%02d" % i for i in range(31)]},
                            exclude=["x-%026d" % i for i in range(40)], window=always)
    doc = rolloutdoc.sign(body, keys.load_private(tmp_path / "rollout"))
    assert len(doc) > 3500
    (server.root / "rollout.json").write_bytes(doc)
    monkeypatch.setenv("MPOTA_NET_TIME", "host")
    settings = deviceconfig.rollout_settings([tmp_path / "rollout.pub"], ["g07"], "pool.ntp.org", always)
    d = make_device(firmware("1.0.0"), server.url, heap=HEAP_FLOOR, rollout=settings)
    d.run()
    st = d.status()
    assert (st["version"], st["last_error"]) == ("2.0.0", None), d.output
    assert d.state()["rollout_seen"] == now - 60


def test_out_of_heap_after_set_boot_still_resets_into_the_new_image(server, firmware, signer, make_device):
    # Once the image is verified and set to boot, what runs out of heap after (here the fleet
    # report, made to raise MemoryError) is not a failed update: ota.update() resets all the same
    # once both stages are gone. (It recorded no-memory and stayed on the old image, which would
    # boot the new one only at some later reset.) This main.py puts the usual one back for the
    # next boot, which confirms the new image.
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    main = d.dev.fs / "main.py"
    (d.dev.fs / "main.next").write_text(main.read_text())
    main.write_text("import os, ota\n"
                    "os.rename('main.next', 'main.py')\n"
                    "def _report(fn, *args):\n"
                    "    if fn == 'result':\n"
                    "        raise MemoryError('the report did not fit')\n"
                    "ota._report = _report\n"
                    "print('returned', ota.update())\n")
    d.run()
    assert "set to boot" in d.output and "returned" not in d.output and "[boot 2]" in d.output, d.output
    st = d.status()
    assert (st["version"], st["last_error"]) == ("2.0.0", None) and "new firmware confirmed" in d.output, d.output
