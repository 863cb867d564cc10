# One source's signed documents, fetched into the block buffer and opened, with only the code
# for that loaded: the HTTP client (dropped once the document is in), then the DSSE envelope and
# the JSON parser. What they return is checked by ota/signature.py (Ed25519, SHA-512). ota/
# updater.py calls each function here, and then the signature check, as calls of their own
# (ota._call), so nothing else of the manifest stage (this module, the offer's checks, the
# slots, otadata) is in the heap while a signature is checked.
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


def manifest(cfg, url, mv):
    # (env, msg, cands): the SHA-256 of the manifest's envelope as served (the fleet's name for
    # the release), and for ota/signature.py the signed message (PAE) and the signatures by a
    # provisioned key (ota/envelope.py's signed_parts()). The body is in the block buffer.
    from binascii import hexlify
    from hashlib import sha256
    data = _fetch(cfg, url, mv)
    env = hexlify(sha256(data).digest()).decode()
    from ota.envelope import signed_parts
    return (env,) + signed_parts(data, cfg.pubkeys)


def rollout(cfg, o, mv):
    # The rollout document beside o's manifest (docs/rollout.md): [msg, cands] for
    # ota/signature.py (against the rollout role's keys only), or (held code, detail) when there
    # is none. A document that is not one, or not by a rollout-role key, is an OtaError of this
    # source (RELEASE: the next source is tried); a transport error too.
    from ota.url import join
    url = join(o.url, "rollout.json")
    try:
        data = _fetch(cfg, url, mv, "rollout-bad", False)
    except OtaError as e:
        if e.code == "http-404" or e.code == "http-410":
            return "rollout-missing", url[:80]
        raise
    from ota.envelope import signed_parts
    try:
        return list(signed_parts(data, cfg.rollout_keys, _ROLLOUT_TYPE, "rollout.json"))
    except OtaError as e:
        raise OtaError("rollout-unknown-key" if e.code == "unknown-key" else "rollout-bad", "rollout.json: " + e.detail)
