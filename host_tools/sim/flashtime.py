"""How long the simulated flash's work would take on a real ESP32 module's SPI NOR chip.

The simulated flash (boards/unix/flash.py) is as fast as the host's disk; a real chip is not,
and on a real board an update's time is mostly erase time. This model takes the typical timings
of the Winbond W25Q32JV (32 Mbit, the kind of chip on ESP32-WROOM-32 modules) from its
datasheet (rev. F, 2017; "AC Electrical Characteristics"): a 4 KiB sector erase tSE = 45 ms
(max 400), a 64 KiB block erase tBE2 = 150 ms (max 2000), a 256-byte page program tPP = 0.4 ms
(max 3); and reads at 10 MB/s (dual I/O at 40 MHz, MicroPython's default flash mode for the
ESP32). Typical, not worst case: a chip near its erase limits, or ESP-IDF's own overhead, adds
to it (arduino-esp32 PR 7002 measured about 1 MiB in 23.6 s with sector erases and 9.8 s with
64 KiB block erases, network included; this model gives 13.2 s and 4.0 s for the flash alone).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
    name: str
    sector_erase_s: float   # 4 KiB
    block_erase_s: float    # 64 KiB
    page_program_s: float   # one page
    page: int
    read_bytes_per_s: float


W25Q32JV = Chip("Winbond W25Q32JV, typical", 0.045, 0.150, 0.0004, 256, 10e6)


def seconds(work: list[int], chip: Chip = W25Q32JV) -> dict:
    """work: [sector erases, block erases, bytes programmed, bytes read] (runner.PowerCut.work)
    -> {"erase", "program", "read", "total"} in seconds."""
    sectors, blocks, programmed, read = work
    out = {"erase": sectors * chip.sector_erase_s + blocks * chip.block_erase_s,
           "program": -(-programmed // chip.page) * chip.page_program_s,
           "read": read / chip.read_bytes_per_s}
    out["total"] = sum(out.values())
    return {k: round(v, 3) for k, v in out.items()}
