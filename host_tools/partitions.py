"""ESP-IDF partition tables: read partitions.csv, write the binary table (with its MD5 entry).

Format of components/partition_table/gen_esp32part.py: 32-byte entries (magic 0x50AA, type,
subtype, offset, size, 16-byte label, flags), then an MD5 entry (0xEBEB, 14 x 0xFF, MD5 of the
entries), padded with 0xFF to 0xC00 bytes.
"""
from __future__ import annotations

import csv
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from . import MpotaError

TABLE_MAX = 0xC00
ENTRY_MAGIC = b"\xAA\x50"
MD5_MAGIC = b"\xEB\xEB"
TYPES = {"app": 0x00, "data": 0x01}
SUBTYPES = {
    0x00: {"factory": 0x00, "test": 0x20, **{f"ota_{i}": 0x10 + i for i in range(16)}},
    0x01: {"ota": 0x00, "phy": 0x01, "nvs": 0x02, "coredump": 0x03, "nvs_keys": 0x04,
           "efuse": 0x05, "undefined": 0x06, "esphttpd": 0x80, "fat": 0x81, "spiffs": 0x82,
           "littlefs": 0x83},
}


@dataclass(frozen=True)
class Partition:
    label: str
    type: int
    subtype: int
    offset: int
    size: int
    flags: int = 0

    @property
    def is_ota_slot(self) -> bool:
        return self.type == 0 and 0x10 <= self.subtype < 0x20


def _num(text: str, what: str, line: int) -> int:
    t = text.strip().lower()
    mult = 1
    if t.endswith("k"):
        t, mult = t[:-1], 1024
    elif t.endswith("m"):
        t, mult = t[:-1], 1024 * 1024
    try:
        return int(t, 0) * mult
    except ValueError:
        raise MpotaError(f"partitions.csv line {line}: bad {what} {text!r}") from None


def parse_csv(path: Path) -> list[Partition]:
    rows = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not row[0] or row[0].startswith("#"):
                continue
            if len(row) < 5:
                raise MpotaError(f"{path} line {line}: expected name, type, subtype, offset, size")
            name, ptype, sub, off, size = row[:5]
            if ptype not in TYPES:
                raise MpotaError(f"{path} line {line}: unknown type {ptype!r}")
            t = TYPES[ptype]
            st = SUBTYPES[t].get(sub)
            if st is None:
                st = _num(sub, "subtype", line)
            rows.append(Partition(name, t, st, _num(off, "offset", line), _num(size, "size", line)))
    return rows


def to_binary(parts: list[Partition]) -> bytes:
    out = bytearray()
    for p in parts:
        label = p.label.encode()
        if len(label) > 16:
            raise MpotaError(f"partition label {p.label!r} is longer than 16 bytes")
        out += ENTRY_MAGIC + struct.pack("<BBII16sI", p.type, p.subtype, p.offset, p.size,
                                         label, p.flags)
    out += MD5_MAGIC + b"\xff" * 14 + hashlib.md5(out).digest()
    if len(out) > TABLE_MAX:
        raise MpotaError("partition table has too many entries")
    return bytes(out) + b"\xff" * (TABLE_MAX - len(out))


def from_binary(data: bytes) -> list[Partition]:
    parts = []
    md5 = hashlib.md5()
    for i in range(0, TABLE_MAX, 32):
        e = data[i:i + 32]
        if e[:2] == ENTRY_MAGIC:
            if len(e) < 32:
                raise MpotaError(f"partition table cut short in entry {i // 32}")
            t, st, off, size, label, flags = struct.unpack("<BBII16sI", e[2:])
            try:
                name = label.rstrip(b"\0").decode()
            except UnicodeDecodeError:
                raise MpotaError(f"partition table entry {i // 32} has a label that is not text") from None
            parts.append(Partition(name, t, st, off, size, flags))
            md5.update(e)
        elif e[:2] == MD5_MAGIC:
            if e[16:] != md5.digest():
                raise MpotaError("partition table MD5 does not match its entries")
            break
        else:
            break
    return parts
