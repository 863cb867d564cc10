"""The device's provisioning file, ota_config.json (read by device/ota/config.py), and the CA
certificate file it names for https servers.

`mpota config` writes them to build/device/ by default (git ignores build/): a config with AES
keys (--aes-key) is a device secret, written with mode 0600."""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import MpotaError, keys, payload, read_input

CA_FILE = "ca.der"  # the CA certificate on the device, next to ota_config.json
MAX_CA_BYTES = 4096  # the device reads the whole file into RAM


def load_ca(path: Path) -> bytes:
    """A CA certificate file (PEM or DER) as DER, the form the device's tls module takes."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    data = read_input(path, "CA certificate")
    try:
        if b"-----BEGIN" in data:
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError:
        raise MpotaError(f"{path} is not an X.509 certificate (PEM or DER)",
                         hint="give the certificate of the CA that signed the server's certificate") from None
    der = cert.public_bytes(Encoding.DER)
    if len(der) > MAX_CA_BYTES:
        raise MpotaError(f"{path} is {len(der)} bytes as DER; the device takes at most {MAX_CA_BYTES}",
                         hint="provision the CA certificate itself, not a bundle")
    return der


def make(pubkeys: list[Path], server: str, *, board: str, chip: str, device_id: str,
         timeout_s: int = 10, mirrors: list[str] = (), aes_keys: list[Path] = (), ca: bytes | None = None,
         fleet: dict | None = None, announce: bool = False, rollout: dict | None = None) -> dict:
    """The config dict; `ca` is the DER certificate (load_ca) that https servers are checked against;
    `fleet` the fleet server entry (fleetprov.config_entry), `announce` names the device in its
    manifest fetches (docs/fleet.md); `rollout` the rollout settings (rollout_settings())."""
    for url in [server, *mirrors]:
        if not (url.startswith("http://") or url.startswith("https://")):
            raise MpotaError(f"server {url!r} is not an http(s) URL", hint="e.g. --server http://192.168.1.10:8000")
    https = [url for url in [server, *mirrors] if url.startswith("https://")]
    if https and ca is None:
        raise MpotaError(f"{https[0]} is https: the device needs the CA certificate that signed the server's",
                         hint="add --ca ca.pem (the device refuses servers it cannot verify)")
    if ca is not None and not https:
        raise MpotaError("--ca is for https servers; every server given is http",
                         hint="drop --ca, or give the https URL")
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
    if ca is not None:
        cfg["ca"] = CA_FILE
    if fleet:
        if fleet["url"].startswith("https://") and ca is None:
            raise MpotaError(f"the fleet server {fleet['url']} is https: the device needs the CA certificate",
                             hint="add --ca ca.pem (the CA that signed the release and fleet servers' certificates)")
        cfg["fleet"] = dict(fleet)
    if announce:
        cfg["announce"] = True
    if rollout:
        add_rollout(cfg, rollout)
    return cfg


MAX_GROUPS = 8  # device/ota/config.py takes at most 8


def parse_window(text: str) -> dict:
    """`--window "CRON,DURATION_S[,UTC_OFFSET_MIN[,JITTER_S]]"` as docs/rollout.md's window, checked
    by the host's rules (mpota.rolloutdoc.check_window), e.g. "0 2 * * *,7200,60,900"."""
    from . import rolloutdoc
    parts = [p.strip() for p in text.split(",")]
    # the cron's own lists ("0 1,2 * * *") keep their commas: the numbers are the last 1-3 parts
    nums = []
    while len(parts) > 1 and len(nums) < 3 and parts[-1].lstrip("-").isdigit() and " " not in parts[-1]:
        nums.insert(0, int(parts.pop()))
    if not nums:
        raise MpotaError(f"--window {text!r}: give CRON,DURATION_S[,UTC_OFFSET_MIN[,JITTER_S]]",
                         hint='e.g. --window "0 2 * * *,7200" (every day 02:00-04:00 UTC) or '
                              '"0 2 * * 1-5,3600,60,900" (weekdays 02:00 at UTC+1, 15 minutes of jitter)')
    w = {"cron": ",".join(parts), "duration_s": nums[0]}
    if len(nums) > 1:
        w["utc_offset_min"] = nums[1]
    if len(nums) > 2:
        w["jitter_s"] = nums[2]
    try:
        return rolloutdoc.check_window(w)
    except rolloutdoc.RolloutError as e:
        raise MpotaError(f"--window {text!r}: {e}", hint=e.hint or "duration 60-86400 s, UTC offset -720 to 840 "
                                                                   "minutes, jitter 0-86400 s") from None


def rollout_settings(rollout_pubs: list[Path] = (), groups: list[str] = (), ntp: str | None = None,
                     window: dict | None = None) -> dict:
    """The rollout part of a device's config (docs/rollout.md), checked: the rollout role's public
    keys, the device's groups, its NTP server and its own maintenance window."""
    from . import rolloutdoc
    out: dict = {}
    if rollout_pubs:
        if len(rollout_pubs) > 8:
            raise MpotaError("give 1 to 8 rollout public keys (--rollout-pub)")
        out["rollout_keys"] = [keys.raw_public(keys.load_public(p)).hex() for p in rollout_pubs]
    if groups:
        if len(groups) > MAX_GROUPS:
            raise MpotaError(f"a device belongs to at most {MAX_GROUPS} groups (--group)")
        try:
            rolloutdoc._names(list(groups), "--group")
        except rolloutdoc.RolloutError as e:
            raise MpotaError(str(e), hint="e.g. --group line-3 --group canary") from None
        out["groups"] = list(dict.fromkeys(groups))
    if ntp is not None:
        if not ntp or len(ntp) > 253 or any(c.isspace() for c in ntp) or "/" in ntp:
            raise MpotaError(f"--ntp {ntp!r} is not a host name", hint="e.g. --ntp pool.ntp.org")
        out["ntp"] = ntp
    if window is not None:
        out["window"] = rolloutdoc.check_window(window)
    return out


def add_rollout(cfg: dict, rollout: dict) -> dict:
    """Write the rollout settings into `cfg`: the "roles" (release: its "pubkeys", which stay for
    older agents; the device reads "roles" when present), "groups", "ntp", "window"."""
    keys_ = rollout.get("rollout_keys")
    if keys_:
        both = set(keys_) & set(cfg["pubkeys"])
        if both:
            raise MpotaError("a key cannot hold both roles: the rollout key may live on the fleet server, the "
                             "release key must not", hint="make a rollout key of its own: mpota keygen keys/rollout")
        cfg["roles"] = {"release": {"keys": list(cfg["pubkeys"]), "threshold": 1},
                        "rollout": {"keys": list(keys_), "threshold": 1}}
    for k in ("groups", "ntp", "window"):
        if rollout.get(k):
            cfg[k] = rollout[k]
    return cfg


def holds_secrets(config: dict) -> bool:
    """AES payload keys and the fleet report secret are device secrets: a config holding them
    is written owner-only."""
    return bool(config.get("aes_keys")) or bool((config.get("fleet") or {}).get("secret"))


def write_file(path: Path, data: bytes, secret: bool = False) -> None:
    """Write a device file by write-then-rename; `secret`: mode 0600 from the first byte on
    (an existing file of wider mode is replaced, not rewritten in place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def write(path: Path, config: dict, ca: bytes | None = None) -> list[Path]:
    """Write ota_config.json (mode 0600 when it holds AES keys), and the CA certificate it names
    next to it; returns the files."""
    path = Path(path)
    files = [(path, (json.dumps(config, indent=1) + "\n").encode(), holds_secrets(config))]
    if ca is not None:
        files.append((path.parent / config["ca"], ca, False))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for p, data, secret in files:
            write_file(p, data, secret)
    except OSError as e:
        raise MpotaError(f"cannot write {e.filename or path}: {e.strerror}",
                         hint="check --out (a file in a directory you can write)") from None
    return [p for p, _, _ in files]
