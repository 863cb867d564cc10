# The DSSE envelope's signatures checked (after ota/envelope.py parsed it): one signature by a
# provisioned key must verify over PAE(payloadType, payload) with Ed25519. Bytes in, the signed
# payload or OtaError out; no I/O.
from ota.errors import OtaError


def verified(msg, cands, code="bad-signature", what=""):
    # msg: PAE as its two parts (envelope.pae); cands: (public key, signature) or None (a
    # signature by a trusted key that is not even base64) for each signature by a provisioned
    # key. code, what: the error's code and the document's name for its detail.
    import gc
    gc.collect()
    from ota.ed25519 import verify
    for c in cands:
        if c and verify(c[0], msg, c[1]):
            return msg[1]
    raise OtaError(code, what + "signature by a provisioned key does not verify")
