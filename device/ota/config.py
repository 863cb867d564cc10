# The device's provisioning, written by `mpota sim create` / `mpota deploy`:
#   ota_config.json  {"server": "http://host:8000/", "pubkeys": ["<64 hex>", ...],
#                     "board": "esp32", "chip": "esp32", "device_id": "dev1", "timeout_s": 10}
# "server" is the release directory URL (manifest.json is fetched from it) or a manifest URL.
from ota.errors import OtaError, DEVICE
from ota import jsonfile

PATH = "ota_config.json"
_MAX = 4096
CHIP_IDS = {"esp32": 0, "esp32s2": 2, "esp32c3": 5, "esp32s3": 9, "esp32c2": 12,
            "esp32c6": 13, "esp32h2": 16}


class Config:
    pass


def _bad(detail):
    return OtaError("bad-config", PATH + ": " + detail, DEVICE)


def load():
    try:
        raw = jsonfile.read(PATH, _MAX)
    except (ValueError, OSError):
        raise _bad("not readable JSON (at most %d bytes)" % _MAX)
    if raw is None:
        raise _bad("missing; provision the device with `mpota deploy` or `mpota sim create`")
    if not isinstance(raw, dict):
        raise _bad("not a JSON object")
    c = Config()
    server = raw.get("server")
    if not isinstance(server, str) or not (server.startswith("http://") or server.startswith("https://")):
        raise _bad("server must be an http:// or https:// URL")
    if server.endswith(".json"):
        c.manifest_url = server
    else:
        c.manifest_url = server.rstrip("/") + "/manifest.json"
    c.base_url = c.manifest_url[:c.manifest_url.rfind("/") + 1]
    keys = raw.get("pubkeys")
    if not isinstance(keys, list) or not keys or len(keys) > 8:
        raise _bad("pubkeys must list 1 to 8 Ed25519 public keys (64 hex digits each)")
    from binascii import unhexlify
    c.pubkeys = []
    for k in keys:
        try:
            kb = unhexlify(k)
        except (ValueError, TypeError):
            kb = b""
        if len(kb) != 32:
            raise _bad("public key %r is not 64 hex digits" % (k,))
        c.pubkeys.append(kb)
    c.chip = raw.get("chip", "esp32")
    if c.chip not in CHIP_IDS:
        raise _bad("unknown chip %r" % (c.chip,))
    c.chip_id = CHIP_IDS[c.chip]
    c.board = raw.get("board", c.chip)
    c.device_id = raw.get("device_id", "")
    t = raw.get("timeout_s", 10)
    c.timeout_s = t if isinstance(t, int) and 0 < t <= 300 else 10
    return c
