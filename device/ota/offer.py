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
    # digest, url, env (the envelope's SHA-256: the fleet's name for the release), running
    # (version), target (slot), install (bool), rejected (why, or None), hold (None, or (code,
    # detail): its rollout document holds it back; ota/rollout.py).
    hold = None


def _fetch_manifest(cfg, url, mv, code="manifest-too-large", agent=True):
    # Read the manifest (or a rollout document: `code` for one too large) into the block buffer
    # `mv`; returns the filled slice. One byte more than the buffer holds means the document is
    # too large: it is refused, not read.
    from ota import http
    resp = http.get(url, cfg.timeout_s, 0, cfg.ca, cfg.agent if agent else None)
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


def _rollout(cfg, st, o, mv):
    # The rollout document beside o's manifest (docs/rollout.md), for a release this device
    # would install, with a rollout role configured: None (install it), or (held code, detail).
    # A document that is not one, or not signed by a rollout-role key, is an OtaError of this
    # source (RELEASE: the next source is tried); a transport error too. The same memory steps
    # as the manifest's: fetched into the block buffer (o.m is parsed: the buffer is free), the
    # HTTP client dropped, the envelope parsed and dropped, then the verifier loaded and dropped.
    import ota
    from ota import http
    url = http.join(o.url, "rollout.json")
    try:
        data = _fetch_manifest(cfg, url, mv, "rollout-bad", False)
    except OtaError as e:
        if e.code == "http-404" or e.code == "http-410":
            return "rollout-missing", url[:80]
        raise
    finally:
        http = None
        ota._drop(("ota.http",))
    try:
        from ota.envelope import signed_parts
        msg, cands = signed_parts(data, cfg.rollout_keys, _ROLLOUT_TYPE, "rollout.json")
        signed_parts = data = None
        ota._drop(("ota.envelope", "ota.jsonfile"))
        from ota.signature import verified
        box = [verified(msg, cands)]  # judge() takes the body out: this frame does not keep it
    except OtaError as e:
        c = e.code
        raise OtaError("rollout-" + c if c == "unknown-key" or c == "bad-signature" else "rollout-bad",
                       "rollout.json: " + e.detail)
    finally:
        signed_parts = verified = data = msg = cands = None
        ota._drop(_VERIFIER)
    from ota.rollout import judge
    try:
        return judge(cfg, st, o, box)
    finally:
        judge = None
        ota._drop(("ota.rollout", "ota.window", "ota.ident", "ota.jsonfile"))


def offer(cfg, st, mv):
    # Ask the server and every mirror, check each offer fully (signature, board, chip, version,
    # security floor, rejected before), and take the best: the highest version this device may
    # install. A source that fails or offers nothing usable (the release we run, an older one,
    # one for another board, one we rejected) is only skipped: it cannot hide a good mirror
    # listed after it. Returns the offer to install; else one that says we are up to date; else
    # one we rejected before (o.rejected: why); else raises the first bad release's error, or
    # the last transport error. With a rollout role, an offer its rollout document holds back
    # (o.hold) is skipped too, but kept to be answered (skipped, with the code) when no source
    # offers anything to install; one held only by its maintenance window is installable: the
    # payload stage downloads it and waits for the window to set it to boot (ota/install.py).
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
_ROLLOUT_TYPE = "application/vnd.mpota.rollout+json"  # ota/rollout.py's PAYLOAD_TYPE, not loaded for it


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
    best = same = seen = held = first_bad = last = None
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
            if o.install and not o.rejected and cfg.rollout_keys is not None:
                parse = decide = None
                ota._drop(("ota.manifest",))  # loaded again for the next source: not at this peak
                o.hold = _rollout(cfg, st, o, mv)
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
        elif o.hold and o.hold[0] != "outside-window":
            held = held or o
            if len(cfg.manifest_urls) > 1:
                _log("%s: %s held back: %s" % (url, o.m.version, o.hold[0]))
        elif best is None or o.m.version_t > best.m.version_t or (o.m.version_t == best.m.version_t and (
                (best.hold and not o.hold) or
                (bool(best.hold) == bool(o.hold) and getattr(o, "issued", 0) > getattr(best, "issued", 0)))):
            # the same release from two sources: the one whose rollout document is newer (a
            # lagging mirror's older document is superseded by it below anyway)
            best = o
        o = None
    if best and cfg.rollout_keys is not None and getattr(best, "issued", 0) < (st.get("rollout_seen") or 0):
        # Its rollout document was superseded by a newer one another source served in this same
        # check (a stale or replaying mirror listed before the origin, whose newer document may
        # halt the rollout): judged on that order alone, it would install past the halt. Held;
        # the next check refuses the older document as a replay.
        best.hold = ("rollout-replayed", "a newer rollout document was seen in this check")
        held = held or best
        best = None
    o = best or held or same or seen
    if o is None:
        raise first_bad or last
    return o
