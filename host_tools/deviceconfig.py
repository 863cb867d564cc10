"""The device's provisioning file, ota_config.json (read by device/ota/config.py)."""
from __future__ import annotations

import json
from pathlib import Path

from . import MpotaError, keys


def make(pubkeys: list[Path], server: str, *, board: str, chip: str, device_id: str,
         timeout_s: int = 10) -> dict:
    if not (server.startswith("http://") or server.startswith("https://")):
        raise MpotaError(f"server {server!r} is not an http(s) URL", hint="e.g. --server http://192.168.1.10:8000")
    if not pubkeys or len(pubkeys) > 8:
        raise MpotaError("give 1 to 8 trusted public keys (--pub)")
    return {"server": server, "pubkeys": [keys.raw_public(keys.load_public(p)).hex() for p in pubkeys],
            "board": board, "chip": chip, "device_id": device_id, "timeout_s": timeout_s}


def write(path: Path, config: dict) -> None:
    Path(path).write_text(json.dumps(config, indent=1) + "\n")
