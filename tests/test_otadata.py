"""otadata: the agent's reader and the simulated bootloader, against records written here
independently (struct + zlib, following ESP-IDF's esp_ota_select_entry_t and otatool.py)."""
from __future__ import annotations

import json

import pytest

from conftest import otadata_record
from mpota.sim import runner

NEW, PENDING, VALID, INVALID, ABORTED, UNDEF = 0, 1, 2, 3, 4, 0xFFFFFFFF
ERASED = b"\xff" * 32


def write_otadata(d, rec0: bytes, rec1: bytes):
    flash = bytearray(d.flash())
    base = 0xD000
    flash[base:base + 0x2000] = b"\xff" * 0x2000
    flash[base:base + 32] = rec0
    flash[base + 0x1000:base + 0x1000 + 32] = rec1
    d.dev.flash.write_bytes(flash)


def on_device(d, code: str, slot="ota_0") -> dict:
    env = runner.device_env(d.dev, MPOTA_RUNNING=slot)
    rc, out = runner.run_micropython(d.dev, ["-c", code], env)
    assert rc == 0, out
    return json.loads(out.strip().splitlines()[-1])


READER = ("import json; from ota import otadata as o; r = o.records(); "
          "print(json.dumps({'records': r, 'active': o.active(2, r), 'states': o.slot_states(2, r)}))")

# (records, expected active (slot, state) or None, expected {slot: state})
CASES = [
    ((ERASED, ERASED), None, {}),
    ((otadata_record(1, VALID), ERASED), [0, "VALID"], {"0": "VALID"}),
    ((ERASED, otadata_record(2, NEW)), [1, "NEW"], {"1": "NEW"}),
    ((otadata_record(1, VALID), otadata_record(2, PENDING)), [1, "PENDING_VERIFY"],
     {"0": "VALID", "1": "PENDING_VERIFY"}),
    ((otadata_record(3, ABORTED), otadata_record(2, VALID)), [1, "VALID"],
     {"0": "ABORTED", "1": "VALID"}),
    ((otadata_record(5, INVALID), otadata_record(4, VALID)), [1, "VALID"],
     {"0": "INVALID", "1": "VALID"}),
    # a record with a bad CRC does not count at all
    ((otadata_record(1, VALID), otadata_record(2, VALID, crc=0x12345678)), [0, "VALID"], {"0": "VALID"}),
    # seq 0xFFFFFFFF means empty even with a matching CRC
    ((otadata_record(0xFFFFFFFF, VALID), otadata_record(4, UNDEF)), [1, "UNDEFINED"], {"1": "UNDEFINED"}),
    # large sequence numbers (beyond 31-bit small ints on the ESP32) still map correctly
    ((otadata_record(0x7FFFFFFF, VALID), otadata_record(0x80000000, VALID)), [1, "VALID"],
     {"0": "VALID", "1": "VALID"}),
]


@pytest.mark.parametrize("recs,active,states", CASES)
def test_agent_reads_independently_written_otadata(recs, active, states, firmware, make_device):
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/")
    write_otadata(d, *recs)
    got = on_device(d, READER)
    assert got["active"] == active
    assert got["states"] == states


BOOT_CASES = [
    # (records before, slot booted, records after (seq, state))
    # just flashed (both records empty): ota_0 boots and gets {seq 1, VALID} in sector 0
    # (set_actual_ota_seq); among unusable records a bad CRC counts as empty
    ((ERASED, ERASED), "ota_0", [[1, VALID], [UNDEF, UNDEF]]),
    ((otadata_record(2, ABORTED, crc=0x1234), ERASED), "ota_0", [[1, VALID], [UNDEF, UNDEF]]),
    # a bad CRC on a record that is not unusable by its state: no active record, every slot is
    # tried from ota_0, and nothing is written
    ((otadata_record(2, VALID, crc=0x1234), ERASED), "ota_0", [[2, VALID], [UNDEF, UNDEF]]),
    # both unusable but not empty (ABORTED with a good CRC): ota_0 boots, nothing is written
    ((otadata_record(3, ABORTED), ERASED), "ota_0", [[3, ABORTED], [UNDEF, UNDEF]]),
    ((otadata_record(1, VALID), otadata_record(2, NEW)), "ota_1", [[1, VALID], [2, PENDING]]),
    # not confirmed before the reset: PENDING_VERIFY becomes ABORTED, the other slot boots
    ((otadata_record(1, VALID), otadata_record(2, PENDING)), "ota_0", [[1, VALID], [2, ABORTED]]),
    ((otadata_record(3, NEW), otadata_record(2, VALID)), "ota_0", [[3, PENDING], [2, VALID]]),
    ((otadata_record(3, ABORTED), otadata_record(2, VALID)), "ota_1", [[3, ABORTED], [2, VALID]]),
]


@pytest.mark.parametrize("recs,slot,after", BOOT_CASES)
def test_simulated_bootloader_follows_esp_idf_rules(recs, slot, after, firmware, make_device):
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/")
    # both slots hold a valid image so the selection alone decides
    flash = bytearray(d.flash())
    img = firmware("1.5.0").read_bytes()
    flash[0x190000:0x190000 + len(img)] = img
    d.dev.flash.write_bytes(flash)
    write_otadata(d, *recs)
    sel = runner.bootloader(d.dev)
    assert sel["slot"] == slot
    if after is not None:
        assert [s[:2] for s in sel["states"]] == after


def test_set_boot_and_confirm_write_what_esp_idf_writes(firmware, make_device):
    # esp_rewrite_ota_data(): next seq for the target slot, NEW state, in the other sector;
    # mark_app_valid_cancel_rollback(): the active record becomes VALID.
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/")
    img = firmware("2.0.0").read_bytes()
    flash = bytearray(d.flash())
    flash[0x190000:0x190000 + len(img)] = img
    d.dev.flash.write_bytes(flash)
    write_otadata(d, otadata_record(1, VALID), ERASED)
    on_device(d, "import esp32, json; esp32.Partition('ota_1').set_boot(); print('{}')")
    od = d.otadata()
    assert od[:32] == otadata_record(1, VALID)
    assert od[0x1000:0x1020] == otadata_record(2, NEW)
    runner.bootloader(d.dev)  # NEW -> PENDING_VERIFY
    assert d.otadata()[0x1000:0x1020] == otadata_record(2, PENDING)
    on_device(d, "import esp32; esp32.Partition.mark_app_valid_cancel_rollback(); print('{}')", "ota_1")
    assert d.otadata()[0x1000:0x1020] == otadata_record(2, VALID)


def test_set_boot_refuses_an_invalid_image(firmware, make_device):
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/")
    img = bytearray(firmware("2.0.0").read_bytes())
    img[5000] ^= 0xFF  # breaks checksum and appended SHA-256
    flash = bytearray(d.flash())
    flash[0x190000:0x190000 + len(img)] = img
    d.dev.flash.write_bytes(flash)
    before = d.otadata()
    out = on_device(d, "import esp32, json\ntry:\n esp32.Partition('ota_1').set_boot(); print('{\"ok\": 1}')\n"
                       "except OSError as e:\n print(json.dumps({'err': e.args[0]}))")
    assert out == {"err": -0x1503}
    assert d.otadata() == before


def test_flash_rules_are_strict(firmware, make_device):
    d = make_device(firmware("1.0.0"), "http://127.0.0.1:9/")
    code = ("import json, esp32\np = esp32.Partition('ota_1')\nr = []\n"
            "for f in (lambda: p.writeblocks(0, b'\\x00' * 16, 0), lambda: p.writeblocks(0, b'\\xff' * 16, 0),"
            " lambda: p.readblocks(p.ioctl(4, 0), bytearray(16)), lambda: p.ioctl(6, 0)):\n"
            "  try:\n    f(); r.append('ok')\n  except OSError as e:\n    r.append(e.args[0])\n"
            "print(json.dumps(r))")
    # clearing bits in erased flash: ok; setting them again without an erase: EIO;
    # reading past the partition: EINVAL; erasing the block: ok
    assert on_device(d, code) == ["ok", 5, 22, "ok"]
