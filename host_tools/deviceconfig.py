"""The device's provisioning file, ota_config.json (read by device/ota/config.py)."""
from __future__ import annotations

import json
from pathlib import Path

from . import MpotaError, keys, payload


def make(pubkeys: list[Path], server: str, *, board: str, chip: str, device_id: str,
         timeout_s: int = 10, mirrors: list[str] = (), aes_keys: list[Path] = ()) -> dict:
    for url in [server, *mirrors]:
        if not (url.startswith("http://") or url.startswith("https://")):
            raise MpotaError(f"server {url!r} is not an http(s) URL", hint="e.g. --server http://192.168.1.10:8000")
    if len(mirrors) > 7:
        raise MpotaError("at most 7 mirrors")
    if not pubkeys or len(pubkeys) > 8:
        raise MpotaError("give 1 to 8 trusted public keys (--pub)")
    cfg = {"server": server, "pubkeys": [keys.raw_public(keys.load_public(p)).hex() for p in pubkeys],
           "board": board, "chip": chip, "device_id": device_id, "timeout_s": timeout_s}
    if mirrors:
        cfg["mirrors"] = list(mirrors)
    if aes_keys:
        cfg["aes_keys"] = [payload.load_aes_key(p).hex() for p in aes_keys]
    return cfg


def write(path: Path, config: dict) -> None:
    Path(path).write_text(json.dumps(config, indent=1) + "\n")
