# Who this device is, for the fleet (docs/fleet.md, "Device side"): its id, the agent's version,
# the event its last update or confirmation ended in, and the fleet settings of ota_config.json.
# Small on purpose: every update() and confirm() asks settings() once per start (the answer stays
# on the package as ota._fl), so a device without a fleet server loads nothing else for it.
#
#   "fleet": {"url": "http://host:8470", "secret": "<64 hex>", "timeout_s": 3, "interval_s": 3600}
#   "announce": true     name the device in manifest fetches (User-Agent and query string)
#
# A fleet entry that is not usable is logged and ignored: reporting must never stop updates.
from micropython import const

AGENT = "0.1.0"  # device/package.json's version
_TIMEOUT_S = const(3)

# ota.status()["last_result"] -> the report's event (the fleet protocol's names)
EVENTS = {"installed": "installed", "confirmed": "confirmed", "up-to-date": "up-to-date",
          "refused": "refused", "failed": "failed", "rolled-back": "rolled-back",
          "skipped": "checked", "interrupted": "failed"}


def event_of(result, code):
    if code == "no-memory":
        return "no-memory"
    return EVENTS.get(result, "failed") if result else None


def _ok(c, more=""):
    return "a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c in "._:-" + more


def _safe(text, more=""):
    # [A-Za-z0-9._:-] (and `more`) only, at most 64: what goes into a header or a query string
    # can never end a line or a field, whatever a firmware calls its version.
    out = ""
    for c in (text or "")[:64]:
        out += c if _ok(c, more) else "-"
    return out


def device_id(configured):
    # ota_config.json's device_id, else machine.unique_id() in hex. The protocol's ids are
    # [A-Za-z0-9._:-]{1,64}: another configured id is None (the host tools refuse to write one).
    if configured:
        return configured if isinstance(configured, str) and len(configured) <= 64 and all(_ok(c) for c in configured) else None
    import machine
    from binascii import hexlify
    return hexlify(machine.unique_id()).decode()


def settings():
    # (url, secret, timeout_s, device id, board, chip, CA file or None) of the fleet server, or
    # False: read from ota_config.json once per start, then kept as ota._fl.
    import ota
    s = getattr(ota, "_fl", None)
    if s is None:
        s = ota._fl = _read()
    return s


def _read():
    from ota import jsonfile
    try:
        raw = jsonfile.read("ota_config.json", 4096)
        f = raw.get("fleet")
    except (ValueError, OSError, AttributeError):
        return False
    if f is None:
        return False
    why = None
    try:
        url = f.get("url")
        from binascii import unhexlify
        try:
            secret = unhexlify(f.get("secret") or "")
        except ValueError:
            secret = b""
        t = f.get("timeout_s", _TIMEOUT_S)
        if not isinstance(url, str) or not (url.startswith("http://") or url.startswith("https://")) or len(url) > 200:
            why = "fleet.url must be an http:// or https:// URL"
        elif len(secret) != 32:
            why = "fleet.secret must be 64 hex digits"
        elif not isinstance(t, int) or not 1 <= t <= 60:
            why = "fleet.timeout_s must be a whole number from 1 to 60"
        elif url.startswith("https://") and not isinstance(raw.get("ca"), str):
            why = "an https fleet.url needs the CA certificate (\"ca\")"
        else:
            did = device_id(raw.get("device_id") or None)
            if did is None:
                why = "device_id must be 1 to 64 of A-Z a-z 0-9 . _ : -"
    except (AttributeError, TypeError, ValueError):
        why = "fleet must be an object with url and secret"
    if why:
        print("ota: fleet: ota_config.json: %s; reports are off" % why)  # never the secret itself
        return False
    return (url.rstrip("/"), secret, t, did,
            _safe(raw.get("board", raw.get("chip", "esp32"))), _safe(raw.get("chip", "esp32")),
            raw.get("ca") if url.startswith("https://") else None)


def announce(cfg, st):
    # "announce": true, for a release server's request log (docs/fleet.md): the query string and
    # the User-Agent every manifest fetch carries, e.g.
    #   ?d=dev1&v=1.0.0&r=rolled-back%3Ahealth-failed
    #   mpota/0.1.0 (d=dev1; v=1.0.0; r=rolled-back:health-failed)
    from ota import slots
    did = _safe(device_id(cfg.device_id or None) or cfg.device_id)
    v = _safe(slots.read_app_desc(slots.running())[0] or "", "+")
    r = event_of(st.get("last_result"), st.get("last_error")) or "none"
    if st.get("last_error"):
        r += ":" + _safe(st["last_error"])
    q = "d=%s&v=%s&r=%s" % (_quote(did), _quote(v), _quote(r))
    return q, "mpota/%s (d=%s; v=%s; r=%s)" % (AGENT, did, v, r)


def _quote(text):
    # percent-encoding of everything but RFC 3986's unreserved characters
    out = ""
    for c in text:
        out += c if c.isalpha() or c.isdigit() or c in "._~-" else "%%%02X" % ord(c)
    return out
