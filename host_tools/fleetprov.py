"""A device's provisioning for the fleet server (docs/fleet.md, "Device side"), for `mpota sim
create --fleet URL` and `mpota deploy --fleet URL`.

The device signs its reports with a secret of its own: 32 random bytes made here, kept in a file
of mode 0600 (hex) and in the device's ota_config.json (then also 0600), never printed. The
server learns it when the device is registered: at once with an admin token (PUT
/v1/admin/devices/{id}), or later with the `mpota fleet register ...` command printed instead.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import urllib.error
import urllib.request
from pathlib import Path

from . import MpotaError

SECRET_BYTES = 32
DEFAULT_TIMEOUT_S = 3       # fleet.timeout_s: the longest a report may hold update() or confirm()
DEFAULT_INTERVAL_S = 3600   # fleet.interval_s: how often the device checks (the server's "silent")
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
_HEX = re.compile(r"[0-9a-f]{64}\Z")


def check_url(url: str) -> str:
    if not re.match(r"https?://[^/\s]+(/\S*)?\Z", url or ""):
        raise MpotaError(f"fleet server {url!r} is not an http(s) URL", hint="e.g. --fleet http://192.168.1.10:8470")
    return url.rstrip("/")


def check_device_id(device_id: str) -> str:
    if not _ID.match(device_id or ""):
        raise MpotaError(f"device id {device_id!r} cannot report to a fleet server",
                         hint="a fleet device id is 1 to 64 of A-Z a-z 0-9 . _ : - (give --device-id)")
    return device_id


def read_secret(path: Path) -> str:
    """The hex secret in `path` (64 hex digits)."""
    try:
        text = Path(path).read_text().strip().lower()
    except OSError as e:
        raise MpotaError(f"cannot read the fleet secret {path}: {e.strerror}") from None
    if not _HEX.match(text):
        raise MpotaError(f"{path} is not a fleet secret (64 hex digits)",
                         hint="remove it to have a new one made, or give another --fleet-secret")
    return text


def write_secret(path: Path, secret_hex: str) -> None:
    """Write `secret_hex` to `path`, mode 0600 from the first byte on (a new file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret_hex + "\n")
    tmp.replace(path)


def secret_at(path: Path) -> tuple[str, bool]:
    """(the secret kept in `path`, made: True if it was made now). An existing file is kept, so
    that a device deployed again keeps its registration."""
    path = Path(path)
    if path.exists():
        return read_secret(path), False
    secret = secrets.token_hex(SECRET_BYTES)
    try:
        write_secret(path, secret)
    except OSError as e:
        raise MpotaError(f"cannot write the fleet secret {path}: {e.strerror}") from None
    return secret, True


def config_entry(url: str, secret_hex: str, timeout_s: int = DEFAULT_TIMEOUT_S,
                 interval_s: int = DEFAULT_INTERVAL_S) -> dict:
    """ota_config.json's "fleet" object (read by device/ota/ident.py)."""
    return {"url": check_url(url), "secret": secret_hex, "timeout_s": timeout_s, "interval_s": interval_s}


def read_token(path: Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise MpotaError(f"cannot read the fleet admin token {path}: {e.strerror}",
                         hint="--fleet-token-file names the file `mpota fleet serve --token-file` uses") from None
    if not token or any(c.isspace() for c in token):
        raise MpotaError(f"{path} holds no admin token (one line, no spaces)")
    return token


def register_command(device_id: str, secret_file: Path, url: str) -> str:
    """The command that registers the device later (docs/fleet.md)."""
    return (f"mpota fleet register {device_id} --secret-file {secret_file} --server {url} "
            f"--token-file TOKEN-FILE")


def register(url: str, token_file: Path, device_id: str, secret_hex: str, *, board: str | None = None,
             interval_s: int | None = None, secret_file: Path | None = None, timeout: float = 10.0) -> dict:
    """PUT {url}/v1/admin/devices/{id} {"secret", "board", "interval_s"} with the admin token;
    the server's JSON answer. MpotaError (with the reason, never the secret) otherwise."""
    token = read_token(token_file)
    body = {"secret": secret_hex}
    if board:
        body["board"] = board
    if interval_s:
        body["interval_s"] = interval_s
    req = urllib.request.Request(f"{check_url(url)}/v1/admin/devices/{check_device_id(device_id)}",
                                 data=json.dumps(body).encode(), method="PUT",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read(65536)
    except urllib.error.HTTPError as e:
        why = {401: "the admin token was refused", 403: "the admin token was refused"}.get(e.code, f"HTTP {e.code}")
        raise MpotaError(f"the fleet server {url} did not register {device_id}: {why}",
                         hint="check --fleet-token-file (the token of `mpota fleet serve`)") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MpotaError(f"cannot reach the fleet server {url}: {reason}",
                         hint="is `mpota fleet serve` running there? register later with: "
                              + register_command(device_id, secret_file or Path("SECRET-FILE"), url)) from None
    try:
        return json.loads(raw or b"{}")
    except ValueError:
        return {}
