#!/usr/bin/env python3
"""The heap the fleet reports cost (docs/memory.md, docs/fleet.md "Device side"): the smallest
MicroPython heap (-X heapsize, to 1 KiB) with which the simulated device

  update           installs a signed 1 MiB release, confirms it and checks once more
                   (as `make bench` measures it), without and with a fleet server configured:
                   with one, every report must also reach the server (checked, downloading,
                   installed, confirmed, up-to-date) and no report may fail for want of heap
  update, queue    the same with the fleet server down all along and the report queue full
  full             (4 KiB): the worst case for the report code inside update()
  confirm          a boot that only confirms (main.py: ota.confirm), without and with fleet:
                   with one, it counts the boot and sends what is queued

A run counts only if the board ended idle (no exception at the REPL) and printed no MemoryError
and no no-memory. Heap layouts vary a little between runs (what the network delivers per read),
so the figures move by a KiB or two.

    .venv/bin/python scripts/bench_fleet_heap.py [--size BYTES]
"""
from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fleet_receiver import FleetReceiver  # noqa: E402
from mpota import espimage, fleetprov, keys, release  # noqa: E402
from mpota.server import serve_in_thread  # noqa: E402
from mpota.sim import device, runner  # noqa: E402

CONFIRM_MAIN = "import ota\nota.confirm(lambda: True)\n"
FILL_MAIN = "import ota\nota.confirm(lambda: True)\nfor i in range(20):\n    ota.update()\n"


class Bench:
    def __init__(self, tmp: Path, size: int):
        self.tmp = tmp
        self.kp = tmp / "k"
        keys.generate(self.kp)
        self.fw1 = tmp / "fw1.bin"
        self.fw1.write_bytes(espimage.build_sim_firmware("1.0.0", size=64 * 1024))
        fw2 = tmp / "fw2.bin"
        fw2.write_bytes(espimage.build_sim_firmware("2.0.0", size=size))
        self.rel = tmp / "rel"
        release.build(fw2, self.rel, [keys.load_private(self.kp)])
        self.same = tmp / "same"  # a release of what the device runs: every check is up to date
        release.build(self.fw1, self.same, [keys.load_private(self.kp)])
        self.httpd, self.url = serve_in_thread(self.rel)
        self.httpd_same, self.url_same = serve_in_thread(self.same)
        self.rx = FleetReceiver().start()
        self.down = FleetReceiver().start()
        self.down.stop()  # a port where nothing listens
        self.secret = secrets.token_hex(32)
        self.rx.register("b", self.secret)

    def device(self, heap: str, fleet_url: str | None, main: str | None = None, server: str | None = None):
        fleet = fleetprov.config_entry(fleet_url, self.secret) if fleet_url else None
        dev = device.create("b", [self.kp.with_name("k.pub")], server or self.url, self.fw1,
                            root=self.tmp / "devices", force=True, heap=heap, fleet=fleet)
        if main:
            (dev.fs / "main.py").write_text(main)
        return dev

    def ok(self, dev, heap: str, expect_version=None, expect_events=None) -> bool:
        self.rx.reports.clear()
        self.rx.highest.clear()
        log: list[str] = []
        try:
            boots = runner.run(dev, heap=heap, echo=log.append, max_boots=4)
        except runner.SimError:
            return False
        text = "\n".join(log)
        failed = [x for x in log if "ota: fleet:" in x and "kept" not in x and "network is down" not in x]
        if boots[-1].exit != "idle" or "MemoryError" in text or "no-memory" in text or failed:
            return False
        if expect_version and runner.status(dev, heap="256K")["version"] != expect_version:
            return False
        return expect_events is None or self.rx.events("b") == expect_events

    def update(self, heap: str, fleet: bool) -> bool:
        dev = self.device(heap, self.rx.url if fleet else None)
        events = ["checked", "downloading", "installed", "confirmed", "up-to-date"] if fleet else None
        return self.ok(dev, heap, "2.0.0", events)

    def update_full_queue(self, heap: str) -> bool:
        # fill the queue with a roomy heap (the server down), then update at `heap`
        dev = self.device("256K", self.down.url, FILL_MAIN, server=self.url_same)
        runner.run(dev, echo=lambda line: None, max_boots=2)
        cfg = json.loads((dev.fs / "ota_config.json").read_text())
        cfg["server"] = self.url
        (dev.fs / "ota_config.json").write_text(json.dumps(cfg))
        (dev.fs / "main.py").write_text((ROOT / "boards" / "unix" / "main.py").read_text())
        return self.ok(dev, heap, "2.0.0")

    def confirm(self, heap: str, fleet: bool) -> bool:
        return self.ok(self.device(heap, self.rx.url if fleet else None, CONFIRM_MAIN), heap)


def smallest(test, lo=24, hi=256) -> int:
    """The smallest heap in KiB with which test(heap) passes (binary search to 1 KiB)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if test(f"{mid}K") else (mid, hi)
    return hi


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024 * 1024, help="image size of the release (default 1 MiB)")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mpota-bench-fleet-"))
    try:
        b = Bench(tmp, a.size)
        rows = [
            ("update", smallest(lambda h: b.update(h, False)), smallest(lambda h: b.update(h, True))),
            ("update, queue full", None, smallest(b.update_full_queue)),
            ("confirm", smallest(lambda h: b.confirm(h, False)), smallest(lambda h: b.confirm(h, True))),
        ]
        print(f"smallest heap, KiB (unix port, .mpy, emulated esp32 module included; release {a.size} bytes)")
        print(f"  {'':<22} {'no fleet':>9} {'fleet':>7}")
        for name, plain, fleet in rows:
            print(f"  {name:<22} {plain if plain is not None else '-':>9} {fleet:>7}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
