# DSSE v1 envelope verification: bytes in, the signed payload bytes out, no I/O.
# The signature is checked over PAE(payloadType, payload) before the payload is parsed, so a
# hostile manifest body never reaches the JSON parser unless a trusted key signed it.
from ota import jsonfile
from binascii import a2b_base64, hexlify
from hashlib import sha256
from ota.errors import OtaError
from ota.ed25519 import verify

PAYLOAD_TYPE = "application/vnd.mpota.manifest+json"
_MAX_SIGS = 8


def keyid(pub):
    # First 16 hex digits of SHA-256 over the raw 32-byte public key.
    return hexlify(sha256(pub).digest()[:8]).decode()


def pae(ptype, body):
    t = ptype.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def _b64(s):
    if not isinstance(s, str):
        raise ValueError
    return a2b_base64(s)


def open_envelope(data, pubkeys):
    try:
        env = jsonfile.loads(data)
        ptype = env["payloadType"]
        body = _b64(env["payload"])
        sigs = env["signatures"]
        if not isinstance(ptype, str) or not isinstance(sigs, list):
            raise ValueError
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise OtaError("bad-envelope", "manifest is not a DSSE envelope")
    if ptype != PAYLOAD_TYPE:
        raise OtaError("bad-payload-type", "payloadType %r is not %s" % (ptype[:64], PAYLOAD_TYPE))
    if len(sigs) > _MAX_SIGS:
        raise OtaError("bad-envelope", "more than %d signatures" % _MAX_SIGS)
    ids = [keyid(k) for k in pubkeys]
    msg = None
    known = False
    for s in sigs:
        if not isinstance(s, dict) or s.get("keyid") not in ids:
            continue
        known = True
        try:
            sig = _b64(s.get("sig"))
        except ValueError:
            continue
        if msg is None:
            msg = pae(ptype, body)
        if verify(pubkeys[ids.index(s["keyid"])], msg, sig):
            return body
    if not known:
        raise OtaError("unknown-key", "no signature by a provisioned key (device trusts %s)" % ", ".join(ids))
    raise OtaError("bad-signature", "signature by a provisioned key does not verify")
