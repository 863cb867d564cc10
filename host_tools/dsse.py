"""DSSE v1 envelopes (the in-toto / Sigstore signing envelope) with Ed25519 signatures.

The signature covers PAE(payloadType, payload) over the exact payload bytes; verifiers check
those bytes and only then parse them, so no canonical-JSON step is needed.
"""
from __future__ import annotations

import base64
import binascii
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import MpotaError
from .keys import keyid

PAYLOAD_TYPE = "application/vnd.mpota.manifest+json"


class EnvelopeError(MpotaError):
    """The envelope is malformed or no trusted signature verifies."""

    def __init__(self, code, message, hint=None):
        super().__init__(message, hint)
        self.code = code


def pae(payload_type: str, body: bytes) -> bytes:
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def sign(body: bytes, keys: list[Ed25519PrivateKey], payload_type: str = PAYLOAD_TYPE) -> bytes:
    msg = pae(payload_type, body)
    env = {
        "payloadType": payload_type,
        "payload": base64.b64encode(body).decode(),
        "signatures": [{"keyid": keyid(k.public_key()), "sig": base64.b64encode(k.sign(msg)).decode()}
                       for k in keys],
    }
    return json.dumps(env, indent=1).encode() + b"\n"


def verify(envelope: bytes, trusted: list[Ed25519PublicKey], payload_type: str = PAYLOAD_TYPE,
           what: str = "manifest.json") -> bytes:
    """Return the payload bytes if a trusted key signed them; raise EnvelopeError otherwise."""
    try:
        env = json.loads(envelope)
        ptype, payload, sigs = env["payloadType"], env["payload"], env["signatures"]
        body = base64.b64decode(payload, validate=True)
        if not isinstance(ptype, str) or not isinstance(sigs, list):
            raise TypeError
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):  # RecursionError: a nesting bomb
        raise EnvelopeError("bad-envelope", f"{what} is not a DSSE envelope") from None
    if ptype != payload_type:
        raise EnvelopeError("bad-payload-type", f"payloadType is {ptype!r}, expected {payload_type!r}")
    by_id = {keyid(k): k for k in trusted}
    msg = pae(ptype, body)
    known = False
    for s in sigs:
        if not isinstance(s, dict) or not isinstance(s.get("keyid"), str) or s["keyid"] not in by_id:
            continue
        known = True
        try:
            by_id[s["keyid"]].verify(base64.b64decode(s.get("sig", ""), validate=True), msg)
            return body
        except (InvalidSignature, ValueError, TypeError, binascii.Error):
            continue
    if not known:
        ids = ", ".join(str(s.get("keyid")) for s in sigs if isinstance(s, dict)) or "none"
        raise EnvelopeError("unknown-key", f"no signature by a trusted key (signed by: {ids}; "
                            f"trusted: {', '.join(by_id) or 'none'})",
                            hint="pass the public key the release was signed with (--pub)")
    raise EnvelopeError("bad-signature", "signature by a trusted key does not verify: "
                        f"{what} was changed after signing")
