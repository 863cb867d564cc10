# The device's provisioning, written by `mpota sim create` / `mpota deploy` / `mpota config`:
#   ota_config.json  {"server": "http://host:8000/", "mirrors": ["http://backup/rel/"],
#                     "pubkeys": ["<64 hex>", ...], "board": "esp32", "chip": "esp32",
#                     "device_id": "dev1", "timeout_s": 10, "ca": "ca.der",
#                     "progress_every": 16, "aes_keys": ["<64 hex>"], "announce": false,
#                     "fleet": {"url", "secret", "timeout_s", "interval_s"} (read by ota/ident.py),
#                     "roles": {"release": {"keys": [...], "threshold": 1},
#                               "rollout": {"keys": [...], "threshold": 1}},
#                     "groups": ["line-3"], "ntp": "pool.ntp.org", "window": {...}}
# "server" and each mirror is a release directory URL (manifest.json is fetched from it) or a
# manifest URL; they are tried in order. "ca" names a DER CA certificate file for https.
# "progress_every": blocks between saves of the download position (for resuming).
# "aes_keys": AES-256 keys for encrypted releases, found by key id (first 16 hex digits of
# SHA-256 of the key); the file is the device's secret, like the Wi-Fi password.
# "roles" (docs/rollout.md, "Keys and their roles"): the keys trusted for each role; "pubkeys" is
# the release role when "roles" is absent. With a "rollout" role every install needs a rollout
# document signed by one of its keys (ota/rollout.py). Thresholds are 1, the only value this
# agent takes. "groups" (<= 8 names), "ntp" (a host for ntptime) and "window" (the device's own
# maintenance window, checked by ota/window.py) are read only for rollouts.
from ota.errors import OtaError, DEVICE
from ota import jsonfile
from binascii import unhexlify, hexlify

PATH = "ota_config.json"
_MAX = 4096
_MAX_CA = 4096  # a DER CA certificate (mpota checks the same bound)
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
    mirrors = raw.get("mirrors") or []
    if not isinstance(mirrors, list) or len(mirrors) > 7:
        raise _bad("mirrors must be a list of at most 7 URLs")
    servers = [raw.get("server")] + mirrors
    c.manifest_urls = []
    for server in servers:
        if not isinstance(server, str) or not (server.startswith("http://") or server.startswith("https://")):
            raise _bad("server and mirrors must be http:// or https:// URLs")
        c.manifest_urls.append(manifest_url(server))
    c.ca = None
    if raw.get("ca"):
        if not isinstance(raw["ca"], str):  # open() takes an int as a file descriptor
            raise _bad("ca must name a file, e.g. \"ca.der\"")
        try:
            with open(raw["ca"], "rb") as f:
                c.ca = f.read(_MAX_CA + 1)
        except (OSError, TypeError):
            raise _bad("cannot read the CA certificate %r" % (raw.get("ca"),))
        if not c.ca or len(c.ca) > _MAX_CA:
            raise _bad("the CA certificate %r is empty or over %d bytes" % (raw["ca"], _MAX_CA))
    roles = raw.get("roles")
    c.rollout_keys = None  # no rollout role: rollout.json is not read (part 1)
    if roles is None:
        c.pubkeys = _keys(raw.get("pubkeys"), "pubkeys")
    elif not isinstance(roles, dict) or not isinstance(roles.get("release"), dict):
        raise _bad("roles must have a release role: {\"keys\": [...]}")
    else:
        c.pubkeys = _role(roles, "release")
        if roles.get("rollout") is not None:
            c.rollout_keys = _role(roles, "rollout")
            if any(k in c.pubkeys for k in c.rollout_keys):  # else the fleet server signs releases
                raise _bad("a key holds one role: a rollout key is also a release key")
    c.groups = raw.get("groups") or []
    if not isinstance(c.groups, list) or len(c.groups) > 8 or \
            not all(isinstance(g, str) and 0 < len(g) <= 64 for g in c.groups):
        raise _bad("groups: at most 8 names")
    c.ntp = raw.get("ntp")
    if c.ntp is not None and not (isinstance(c.ntp, str) and 0 < len(c.ntp) <= 253):
        raise _bad("ntp must be a host name")
    c.window = raw.get("window")
    if c.window is not None:
        from ota.window import check
        try:
            check(c.window)
        except ValueError as e:
            raise _bad("window: %s" % e)
        finally:
            check = None
            import ota
            ota._drop(("ota.window",))
    c.chip = raw.get("chip", "esp32")
    if c.chip not in CHIP_IDS:
        raise _bad("unknown chip %r" % (c.chip,))
    c.chip_id = CHIP_IDS[c.chip]
    c.board = raw.get("board", c.chip)
    c.device_id = raw.get("device_id", "")
    c.announce = raw.get("announce") is True  # name the device in manifest fetches (ota/ident.py)
    c.agent = None  # (query, User-Agent) when it does
    c.aes_keys = {}
    aes = raw.get("aes_keys") or []
    if not isinstance(aes, list) or len(aes) > 4:
        raise _bad("aes_keys must list at most 4 AES-256 keys (64 hex digits each)")
    from hashlib import sha256
    for k in aes:
        kb = _key32(k, "AES key")
        c.aes_keys[hexlify(sha256(kb).digest()[:8]).decode()] = kb
    c.timeout_s = _int(raw, "timeout_s", 10, 1, 300)
    c.progress_every = _int(raw, "progress_every", 16, 1, 4096)
    return c


def manifest_url(release):
    # A release directory URL -> its manifest.json; a URL of a .json file is the manifest itself.
    return release if release.endswith(".json") else release.rstrip("/") + "/manifest.json"


def _keys(keys, what):
    if not isinstance(keys, list) or not keys or len(keys) > 8:
        raise _bad("%s must list 1 to 8 Ed25519 public keys (64 hex digits each)" % what)
    return [_key32(k, "public key") for k in keys]


def _role(roles, name):
    r = roles[name]
    if not isinstance(r, dict):
        raise _bad("roles.%s must be {\"keys\": [...]}" % name)
    if r.get("threshold", 1) != 1 or r.get("threshold") is True:
        raise _bad("roles.%s.threshold is %r: this agent takes 1 (one signature by a key of the role)"
                   % (name, r.get("threshold")))
    return _keys(r.get("keys"), "roles.%s.keys" % name)


def _key32(text, what):
    # A 32-byte key written as 64 hex digits (never echoed: it may be a secret).
    try:
        kb = unhexlify(text)
    except (ValueError, TypeError):
        kb = b""
    if len(kb) != 32:
        raise _bad("a %s is not 64 hex digits" % what)
    return kb


def _int(raw, key, default, lo, hi):
    v = raw.get(key, default)
    if not isinstance(v, int) or not lo <= v <= hi:
        raise _bad("%s must be a whole number from %d to %d" % (key, lo, hi))
    return v
