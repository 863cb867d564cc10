# DSSE v1 envelope verification: bytes in, the signed payload bytes out, no I/O.
# The signature is checked over PAE(payloadType, payload) before the payload is parsed, so a
# hostile manifest body never reaches the JSON parser unless a trusted key signed it. The same
# for rollout documents (ota/rollout.py): their own payloadType, checked against the rollout
# role's keys only, so a key of one role can never sign the other's document.
from ota import jsonfile
from binascii import a2b_base64, hexlify
from hashlib import sha256
from ota.errors import OtaError

PAYLOAD_TYPE = "application/vnd.mpota.manifest+json"
_MAX_SIGS = 8
# Values and containers an envelope may have before its signature is checked: the object, its
# 3 fields (6 with their separators), the signature list and up to 8 signatures of 2 fields each;
# anything far beyond that is refused before json.loads() builds a heap object per value.
_ITEMS = 64


def keyid(pub):
    # First 16 hex digits of SHA-256 over the raw 32-byte public key.
    return hexlify(sha256(pub).digest()[:8]).decode()


def pae(ptype, body):
    # PAE(type, body) = "DSSEv1 " len(type) " " type " " len(body) " " body, as the two parts
    # ed25519.verify() hashes in turn: the body is not copied into one more large buffer.
    t = ptype.encode()
    return (b"DSSEv1 %d %s %d " % (len(t), t, len(body)), body)


def _b64(s):
    if not isinstance(s, str):
        raise ValueError
    return a2b_base64(s)


def open_envelope(data, pubkeys, ptype=PAYLOAD_TYPE, what="manifest"):
    # The signed body, or OtaError: the envelope parsed (signed_parts), then its signatures
    # checked (ota/signature.py). ota/verify.py makes the same two steps with this module and the
    # JSON parser forgotten in between, so they and Ed25519 are never in the heap at once.
    msg, cands = signed_parts(data, pubkeys, ptype, what)
    from ota.signature import verified
    return verified(msg, cands)


def signed_parts(data, pubkeys, want=PAYLOAD_TYPE, what="manifest"):
    # (PAE as its two parts, [(public key, signature) or None per signature by a provisioned
    # key]), or OtaError; nothing is verified here. The envelope is let go before this returns:
    # its 3 KiB base64 string never shares the heap with Ed25519's code and tables. `data` is
    # consumed: if it is writable (the block buffer), the decoded body is put at its start and
    # the PAE's second part is a view of it.
    try:
        env = jsonfile.loads(data, _ITEMS)
        ptype = env["payloadType"]
        body = _b64(env["payload"])
        sigs = env["signatures"]
        if not isinstance(ptype, str) or not isinstance(sigs, list):
            raise ValueError
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise OtaError("bad-envelope", what + " is not a DSSE envelope")
    env = None
    try:
        # The document's buffer (the update's block buffer) is free once it is parsed: the
        # signed body goes there rather than stay in the heap through the signature check.
        n = len(body)
        data[:n] = body
        body = data[:n]
    except TypeError:  # read-only bytes: the body stays where it is
        pass
    if ptype != want:
        raise OtaError("bad-payload-type", "payloadType %r is not %s" % (ptype[:64], want))
    if len(sigs) > _MAX_SIGS:
        raise OtaError("bad-envelope", "more than %d signatures" % _MAX_SIGS)
    ids = [keyid(k) for k in pubkeys]
    cands = []  # (public key, signature) of every signature by a provisioned key
    for s in sigs:
        if isinstance(s, dict) and s.get("keyid") in ids:
            try:
                cands.append((pubkeys[ids.index(s["keyid"])], _b64(s.get("sig"))))
            except ValueError:
                cands.append(None)  # by a key we trust, and not even base64: a bad signature
    sigs = None
    if not cands:
        raise OtaError("unknown-key", "no signature by a provisioned key (device trusts %s)" % ", ".join(ids))
    return pae(ptype, body), cands
