"""Helpers shared by the fleet tests: reports as a device would send them."""
from __future__ import annotations

import secrets

from mpota.fleet.client import blank_report
from mpota.fleet.protocol import Batch, encode_batch, parse_batch

BASE = dict(version="1.0.0", slot="ota_0", slots={"ota_0": "valid", "ota_1": "empty"}, board="esp32", chip="esp32",
            boots=1, reset=1, heap=110000)


def rep(n: int, event: str, **fields) -> dict:
    return blank_report(n, event, **{**BASE, **fields})


def batch(device: str, reports: list[dict]) -> Batch:
    return parse_batch(encode_batch(device, reports), device)


def new_secret() -> str:
    return secrets.token_bytes(32).hex()


def update_story(n0: int, frm: str, to: str, outcome: str, *, code=None, boots=1) -> list[dict]:
    """The reports of one update from `frm` to `to` ending in outcome (confirmed, rolled-back,
    installed: silent after the install, refused, failed)."""
    out = [rep(n0, "checked", version=frm, boots=boots), rep(n0 + 1, "downloading", version=frm, target=to, boots=boots)]
    if outcome in ("refused", "failed"):
        return out + [rep(n0 + 2, outcome, version=frm, target=to, code=code or "bad-signature", boots=boots)]
    out.append(rep(n0 + 2, "installed", version=frm, target=to, boots=boots))
    if outcome == "confirmed":
        out.append(rep(n0 + 3, "confirmed", version=to, slot="ota_1", boots=boots + 1))
    elif outcome == "rolled-back":
        out.append(rep(n0 + 3, "rolled-back", version=frm, target=to, code=code or "health-failed", boots=boots + 2,
                       reset=3))
    return out


def seed_fleet(store, now: float, *, devices_per_board: int = 24) -> dict:
    """A fleet with a history over the last two days, through storage (with backdated receive
    times): 1.1.0 confirmed nearly everywhere, then 1.2.0 rolled back on many esp32s3 boards,
    one device failed-silent after installing 1.2.0, one in a boot loop, one leaking heap,
    one refusing 1.2.0 with bad-signature. Returns {device id: secret}."""
    secrets_ = {}
    t0 = now - 2 * 86400
    for b, board in enumerate(("esp32", "esp32s3")):
        for i in range(devices_per_board):
            dev = f"{board}-{i:02d}"
            sec = new_secret()
            secrets_[dev] = sec
            store.register(dev, sec, interval_s=3600, cohort="canary" if i < 4 else "general", now=t0)
            chip = board
            kw = dict(board=board, chip=chip)
            n = 1
            t = t0 + 600 * i + 60 * b
            first = [dict(r, **kw) for r in update_story(n, "1.0.0", "1.1.0", "confirmed")]
            store.ingest(batch(dev, first[:3]), sec, now=t)
            store.ingest(batch(dev, first[3:]), sec, now=t + 40 + (i % 7) * 3)
            n = len(first) + 1
            t = t0 + 86400 + 900 * i + 60 * b
            if board == "esp32s3" and i % 3 == 0:
                outcome, code = "rolled-back", "health-failed"
            elif dev == "esp32-05":
                outcome, code = "installed", None  # never heard of again: failed-silent
            elif dev == "esp32-07":
                outcome, code = "refused", "bad-signature"
            else:
                outcome, code = "confirmed", None
            story = [dict(r, **kw) for r in update_story(n, "1.1.0", "1.2.0", outcome, code=code, boots=2)]
            store.ingest(batch(dev, story[:3]), sec, now=t)
            if len(story) > 3:
                store.ingest(batch(dev, story[3:]), sec, now=t + 45 + (i % 5) * 4)
            n += len(story)
            if outcome != "installed":
                version = "1.2.0" if outcome == "confirmed" else "1.1.0"
                heap = 43000 if dev == "esp32-11" else 108000 + 400 * (i % 6)
                store.ingest(batch(dev, [rep(n, "up-to-date", version=version, heap=heap, boots=3, **kw)]), sec,
                             now=now - 1800 + 10 * i)
                n += 1
            if dev == "esp32s3-01":  # a boot loop: the boot counter racing in the last hour
                store.ingest(batch(dev, [rep(n + k, "boot", version="1.2.0", boots=10 + 2 * k, reset=3, **kw)
                                         for k in range(5)]), sec, now=now - 600)
    return secrets_
