# The manifest stage of an update: ask every source for its signed manifest, verify it, check it
# against this device, and keep the best offer. Loaded by ota.update() and ota.check() for this
# stage only, with the DSSE envelope, Ed25519, SHA-512 and the manifest's checks: all of them are
# forgotten when the stage's call returns (ota/__init__.py), before the payload stage.
from micropython import const
import hashlib
from binascii import hexlify
from ota.errors import OtaError, RELEASE, TRANSPORT, DEVICE
from ota import slots, otadata

_MANIFEST_MAX = const(4096)  # fits the block buffer


def _log(msg):
    print("ota: " + msg)


class Offer:
    # The release a source offers and what this device makes of it: m (the parsed manifest),
    # digest, url, running (version), target (slot), install (bool), rejected (why, or None).
    pass


def _fetch_manifest(cfg, url, mv):
    # Read the manifest into the block buffer `mv`; returns the filled slice. One byte more
    # than the buffer holds means the manifest is too large: it is refused, not read.
    from ota import http
    resp = http.get(url, cfg.timeout_s, 0, cfg.ca, cfg.agent)
    try:
        n = resp.length
        if n is not None and n > _MANIFEST_MAX:
            raise OtaError("manifest-too-large", "%d bytes > %d" % (n, _MANIFEST_MAX))
        got = http.read_full(resp, mv[:_MANIFEST_MAX])
        if got == _MANIFEST_MAX and http.read_full(resp, bytearray(1)):
            raise OtaError("manifest-too-large", "more than %d bytes" % _MANIFEST_MAX)
        if n is not None and got != n:
            raise OtaError("truncated", "manifest: %d of %d bytes" % (got, n), TRANSPORT)
        return mv[:got]
    finally:
        resp.close()


def offer(cfg, st, mv):
    # Ask the server and every mirror, check each offer fully (signature, board, chip, version,
    # security floor, rejected before), and take the best: the highest version this device may
    # install. A source that fails or offers nothing usable (the release we run, an older one,
    # one for another board, one we rejected) is only skipped: it cannot hide a good mirror
    # listed after it. Returns the offer to install; else one that says we are up to date; else
    # one we rejected before (o.rejected: why); else raises the first bad release's error, or
    # the last transport error.
    all_slots = slots.ota_slots()
    run = slots.running()
    act = otadata.active(len(all_slots), otadata.records())
    pend = st.get("pending")
    if (act is not None and act[1] == "PENDING_VERIFY" and slots.index_of(run, all_slots) == act[0]) or \
            (pend and pend.get("slot") == run.info()[4]):
        # Writing the other slot now would overwrite the image we would roll back to.
        raise OtaError("not-confirmed", "this image is still on trial: call ota.confirm() first", DEVICE)
    if pend and act is not None and all_slots[act[0]].info()[4] == pend.get("slot"):
        # Our set_boot() has not been booted yet (a soft reset or a wake from deep sleep skips
        # the bootloader): writing that slot again, then set_boot() a second time, would write a
        # second record over the last good one. The install is done; a reset boots it.
        raise OtaError("reboot-pending", "%s is installed in %s and boots at the next reset"
                       % (pend.get("version"), pend.get("slot")), DEVICE)
    return _best_offer(cfg, st, mv, run)


_VERIFIER = ("ota.envelope", "ota.signature", "ota.ed25519", "ota.sha512")


def _rejected(st, digest):
    # why the release of `digest` was rejected before, or None (state.rejected_reason(), without
    # loading ota.state in this stage)
    for r in st["rejected"]:
        if r.get("digest") == digest:
            return r.get("reason")
    return None


def _best_offer(cfg, st, mv, run):
    import ota
    running, secure = slots.read_app_desc(run)
    # The anti-rollback floor: the newest confirmed release's counter, and never below what the
    # running image itself says (esp_app_desc_t.secure_version), whatever the state file holds.
    floor = max(st["floor"], secure)
    target = run.get_next_update()
    best = same = seen = first_bad = last = None
    for url in cfg.manifest_urls:
        try:
            # each source's manifest through the verifier, loaded for it and dropped after it,
            # then through the manifest's checks
            data = _fetch_manifest(cfg, url, mv)
            env = hexlify(hashlib.sha256(data).digest()).decode()  # the fleet's name for it
            ota._drop(("ota.http",))  # loaded again for the next source, and the payload
            try:
                from ota.envelope import signed_parts
                msg, cands = signed_parts(data, cfg.pubkeys)
                signed_parts = data = None
                ota._drop(("ota.envelope", "ota.jsonfile"))  # parsed: the verifier gets their heap
                from ota.signature import verified
                body = verified(msg, cands)
            finally:
                signed_parts = verified = data = msg = cands = None
                ota._drop(_VERIFIER)
            from ota.manifest import parse, decide
            o = Offer()
            o.m = parse(body)
            o.digest = hexlify(hashlib.sha256(body).digest()).decode()
            body = None
            o.url = url
            o.env = env
            o.running = running
            o.target = target
            o.install = decide(o.m, cfg, running, floor, target.info()[3])
            o.rejected = _rejected(st, o.digest)
        except OtaError as e:
            if len(cfg.manifest_urls) > 1:
                _log("%s: %s (%s)" % (url, e.code, e.detail))
            last = e
            if e.kind == RELEASE and first_bad is None:
                first_bad = e
            continue
        if not o.install:
            same = same or o
        elif o.rejected:
            seen = seen or o
            if len(cfg.manifest_urls) > 1:
                _log("%s: %s was rejected before (%s)" % (url, o.m.version, o.rejected))
        elif best is None or o.m.version_t > best.m.version_t:
            best = o
        o = None
    o = best or same or seen
    if o is None:
        raise first_bad or last
    return o
