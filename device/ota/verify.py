# One source's signed documents, fetched into the block buffer and verified, with only the code
# for that loaded: the HTTP client (dropped once the document is in), the DSSE envelope and the
# JSON parser (dropped once it is parsed), then Ed25519 and SHA-512. ota/updater.py calls each
# function here as a call of its own (ota._call), so the manifest stage's other code (the
# offer's checks, the slots, otadata) is not in the heap while a signature is checked.
from micropython import const
from ota.errors import OtaError, TRANSPORT
import ota

_MANIFEST_MAX = const(4096)  # fits the block buffer
_ROLLOUT_TYPE = "application/vnd.mpota.rollout+json"  # ota/rollout.py's PAYLOAD_TYPE, not loaded for it


def _fetch(cfg, url, mv, code="manifest-too-large", agent=True):
    # Read the manifest (or a rollout document: `code` for one too large) into the block buffer
    # `mv`; returns the filled slice. One byte more than the buffer holds means the document is
    # too large: it is refused, not read.
    from ota import http
    try:
        resp = http.get(url, cfg.timeout_s, 0, cfg.ca, cfg.agent if agent else None, mv)
        try:
            n = resp.length
            if n is not None and n > _MANIFEST_MAX:
                raise OtaError(code, "%d bytes > %d" % (n, _MANIFEST_MAX))
            got = http.read_full(resp, mv[:_MANIFEST_MAX])
            if got == _MANIFEST_MAX and http.read_full(resp, bytearray(1)):
                raise OtaError(code, "more than %d bytes" % _MANIFEST_MAX)
            if n is not None and got != n:
                raise OtaError("truncated", "%s: %d of %d bytes" % (url[url.rfind("/") + 1:], got, n), TRANSPORT)
            return mv[:got]
        finally:
            resp.close()
    finally:
        http = None
        ota._drop(("ota.http", "ota.body", "ota.url"))


def _open(data, keys, ptype, what):
    # The signed body of the envelope in `data`, or OtaError: parsed, its parser dropped, then
    # its signatures checked.
    from ota.envelope import signed_parts
    msg, cands = signed_parts(data, keys, ptype, what)
    signed_parts = data = None
    ota._drop(("ota.envelope", "ota.jsonfile"))  # parsed: the verifier gets their heap
    from ota.signature import verified
    return verified(msg, cands)


def manifest(cfg, url, mv):
    # (env, body): the SHA-256 of the manifest's envelope as served (the fleet's name for the
    # release), and the manifest a provisioned key signed.
    from binascii import hexlify
    from hashlib import sha256
    data = _fetch(cfg, url, mv)
    env = hexlify(sha256(data).digest()).decode()
    from ota.envelope import PAYLOAD_TYPE
    return env, _open(data, cfg.pubkeys, PAYLOAD_TYPE, "manifest")


def rollout(cfg, o, mv):
    # The rollout document beside o's manifest (docs/rollout.md): [body] signed by a key of the
    # rollout role (for ota/rollout.py's judge(), which takes it out of the list), or (held
    # code, detail) when there is none. A document that is not one, or not signed by a
    # rollout-role key, is an OtaError of this source (RELEASE: the next source is tried); a
    # transport error too.
    from ota.url import join
    url = join(o.url, "rollout.json")
    try:
        data = _fetch(cfg, url, mv, "rollout-bad", False)
    except OtaError as e:
        if e.code == "http-404" or e.code == "http-410":
            return "rollout-missing", url[:80]
        raise
    try:
        return [_open(data, cfg.rollout_keys, _ROLLOUT_TYPE, "rollout.json")]
    except OtaError as e:
        c = e.code
        raise OtaError("rollout-" + c if c == "unknown-key" or c == "bad-signature" else "rollout-bad",
                       "rollout.json: " + e.detail)
