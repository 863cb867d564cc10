"""Never brick: cut the power at every flash operation of an update, of a confirm and of a
rollback — before the operation, and torn (half of it done) — then let the device boot on.

After every case: it boots a complete image whose SHA-256 is the old or the new release's,
otadata names the slot it boots, the agent's state files parse, it ends on the new release
when the update could finish (on the old one when the release is bad), it is never in a reset
loop, and one more boot changes nothing. The method is MCUboot's simulator's, on the real
agent in the real micropython binary.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPORT
from mpota.sim import runner
from mpota.sim.device import SimDevice

SIZE = 24 * 1024  # 6 flash blocks: every kind of operation, few cases
WORKERS = max(2, os.cpu_count() or 2)


def count_ops(dev: SimDevice, tmp: Path) -> int:
    return measure(dev, tmp).used


def measure(dev: SimDevice, tmp: Path) -> runner.PowerCut:
    cut = runner.PowerCut(None, ops_file=tmp / "ops")
    runner.run(dev, echo=lambda line: None, cut=cut)
    return cut


def clone(template: SimDevice, dest: Path) -> SimDevice:
    shutil.copytree(template.path, dest)
    return SimDevice(template.name, dest, template.board, template.heap, hardware=dict(template.hardware))


def sha_of_slot(dev: SimDevice, slot: str, size: int) -> str:
    off = {"ota_0": 0x10000, "ota_1": 0x190000}[slot]
    with open(dev.flash, "rb") as f:
        f.seek(off)
        return hashlib.sha256(f.read(size)).hexdigest()


FS_LOST = "the filesystem itself lost its directory"


def fs_intact(dev: SimDevice) -> bool:
    """Does the device's filesystem still mount, hold what `sim create` put there, and take a
    new file? (A FAT that lost a sector of its table may still read, and be full of lost
    clusters.)"""
    if not all(runner.fs_read(dev, f) is not None for f in ("main.py", "ota_config.json")):
        return False
    try:
        runner.fs_write(dev, "probe", b"x" * 8192)
    except runner.SimError:
        return False
    return runner.fs_read(dev, "probe") == b"x" * 8192


def check_case(dev: SimDevice, at: int, tear: bool, images: dict, expect: str, tmp: Path) -> str | None:
    """Run one case; return None if every invariant holds, else what broke (FS_LOST when a FAT
    filesystem broke under the cut: see the FAT sweep)."""
    log = []
    try:
        runner.run(dev, echo=log.append, cut=runner.PowerCut(at, tear, tmp / f"ops-{at}-{tear}"), max_boots=10)
    except runner.SimError as e:
        return f"cut at {at} tear={tear}: {e}\n" + "\n".join(log[-30:])
    if dev.hardware.get("fs") == "fat" and not fs_intact(dev):
        return FS_LOST
    sel = dev.running
    if sel["version"] not in images:
        return f"cut at {at}: boots unknown version {sel['version']}"
    if sha_of_slot(dev, sel["slot"], len(images[sel["version"]])) != hashlib.sha256(images[sel["version"]]).hexdigest():
        return f"cut at {at}: slot {sel['slot']} does not hold a complete {sel['version']}"
    st = runner.status(dev)
    if st["slots"][sel["slot"]] not in ("VALID", "UNDEFINED"):
        return f"cut at {at}: otadata says {st['slots']} while {sel['slot']} runs"
    if runner.read_state(dev) is None:
        return f"cut at {at} tear={tear}: no intact state file"
    if sel["version"] != expect:
        # A cut during the new image's trial is power lost, not the release's fault: the agent
        # tries it again at a later check (after a back-off of one check). Give it two more.
        for _ in range(2):
            if dev.running["version"] == expect:
                break
            runner.run(dev, echo=log.append, max_boots=10)
        if dev.running["version"] != expect:
            return f"cut at {at} tear={tear}: ended on {dev.running['version']}, expected {expect}\n" + \
                "\n".join(log[-30:])
    before = dev.flash.read_bytes()
    again = runner.run(dev, echo=lambda line: None, max_boots=2)
    if [b.exit for b in again] != ["idle"] or dev.flash.read_bytes() != before:
        return f"cut at {at} tear={tear}: one more boot changed something"
    return None


def sweep(template, images, expect, tmp, name):
    n = count_ops(clone(template, tmp / "count"), tmp)
    assert n > 10
    cases = [(at, tear) for at in range(1, n + 1) for tear in (False, True)]

    def one(case):
        at, tear = case
        return check_case(clone(template, tmp / f"c{at}-{int(tear)}"), at, tear, images, expect, tmp)

    with ThreadPoolExecutor(WORKERS) as pool:
        results = [f for f in pool.map(one, cases) if f]
    failures = [f for f in results if f != FS_LOST]
    lost = len(results) - len(failures)
    REPORT.append(f"power-loss sweep '{name}': {n} flash operations x (before, torn) = {len(cases)} cases, "
                  f"{len(failures)} failed" + (f"; in {lost} {FS_LOST} (FAT: README, 'Reliability')" if lost else ""))
    assert not failures, "\n\n".join(failures[:3])
    return lost


@pytest.fixture
def template(server, firmware, signer, make_device):
    def make(new_behavior="healthy", fs="host", erase64=False):
        old = firmware("1.0.0", size=SIZE)
        new = firmware("2.0.0", new_behavior, size=SIZE)
        server.publish(new, signer)
        d = make_device(old, server.url, hardware={"fs": fs, "erase64": erase64})
        d.config(progress_every=2)
        return d.dev, {"1.0.0": old.read_bytes(), "2.0.0": new.read_bytes()}
    return make


def test_power_cut_at_every_operation_of_an_update_and_confirm(template, tmp_path):
    dev, images = template()
    sweep(dev, images, "2.0.0", tmp_path, "update + confirm")


def test_power_cut_at_every_operation_of_an_update_with_64k_block_erases(template, tmp_path):
    # A firmware whose Partition(label, 65536).ioctl(6) erases a 64 KiB block: the agent erases
    # the slot's first region at once and writes its blocks without an erase. A cut in the
    # middle leaves a region erased by a process that is gone: the resumed download erases
    # sector by sector again (install.Slot), and every invariant holds.
    dev, images = template(erase64=True)
    cut = measure(clone(dev, tmp_path / "measure"), tmp_path)
    assert cut.work[1] >= 1, cut.work  # block erases did happen
    sweep(dev, images, "2.0.0", tmp_path, "update + confirm, 64 KiB block erases")


def test_power_cut_at_every_operation_of_a_rollback(template, tmp_path):
    dev, images = template("unhealthy")
    sweep(dev, images, "1.0.0", tmp_path, "update + failed health check + rollback")


def test_power_cut_at_every_operation_of_a_compressed_update(server, firmware, signer, make_device, tmp_path):
    old = firmware("1.0.0", size=SIZE)
    new = firmware("2.0.0", size=SIZE)
    server.publish(new, signer, compress=True, chunk=8192)
    d = make_device(old, server.url)
    d.config(progress_every=2)
    sweep(d.dev, {"1.0.0": old.read_bytes(), "2.0.0": new.read_bytes()}, "2.0.0", tmp_path, "compressed update")


def test_random_series_of_power_cuts(template, tmp_path):
    dev, images = template()
    n = count_ops(clone(dev, tmp_path / "count"), tmp_path)
    rng = random.Random(20261126)
    series = [[rng.randint(1, n) for _ in range(rng.randint(2, 4))] for _ in range(12)]

    def one(i):
        d = clone(dev, tmp_path / f"s{i}")
        for j, at in enumerate(series[i]):
            try:
                runner.run(d, echo=lambda line: None, cut=runner.PowerCut(at, rng.random() < 0.5, tmp_path / f"o{i}-{j}"),
                           max_boots=10)
            except runner.SimError as e:
                return f"series {series[i]} cut {j}: {e}"
        return check_case(d, 10 ** 6, False, images, "2.0.0", tmp_path)  # the last run: no cut

    with ThreadPoolExecutor(WORKERS) as pool:
        failures = [f for f in pool.map(one, range(len(series))) if f]
    REPORT.append(f"power-loss random series: {len(series)} series of 2-4 cuts (seed 20261126), "
                  f"{len(failures)} failed")
    assert not failures, "\n\n".join(failures[:3])


def test_power_cut_at_every_operation_of_a_first_boot_and_update(template, tmp_path):
    # a board just flashed (otadata blank, as esptool leaves it): the bootloader's first record
    # (set_actual_ota_seq) is cut too
    dev, images = template()
    flash = bytearray(dev.flash.read_bytes())
    flash[0xD000:0xF000] = b"\xff" * 0x2000
    dev.flash.write_bytes(flash)
    dev.running = {}
    dev.save()
    sweep(dev, images, "2.0.0", tmp_path, "first boot + update + confirm")


@pytest.mark.parametrize("fs", ["littlefs", "fat"])
def test_power_cut_at_every_operation_with_the_filesystem_in_the_flash(fs, template, tmp_path):
    # The filesystem is what the ESP32 port mounts (VfsLfs2 or VfsFat on the vfs partition): every
    # write of the agent's state is flash operations the sweep cuts, before and torn. On FAT a
    # rename over a file is a remove then a rename (VfsFat.rename): the agent writes its two
    # state copies in place and never renames. LittleFS is built for power loss: every case
    # must hold. FAT on a raw partition is not: VfsFat writes a 4 KiB block as an erase, then a
    # write (esp32.Partition.writeblocks), and a cut between the two wipes a sector of its FAT or
    # of a directory — main.py and the config with it, whatever the agent does. Those cases are
    # counted apart; every other one must hold, and the agent's state must survive.
    dev, images = template(fs=fs)
    if fs == "fat":
        dev.heap = "160K"  # a mounted VfsFat holds a 4 KiB sector buffer in the heap (docs/memory.md)
        dev.save()
    lost = sweep(dev, images, "2.0.0", tmp_path, f"update + confirm, state on {fs}")
    assert lost == 0 or fs == "fat"
