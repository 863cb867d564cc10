# The manifest stage's judgement of the sources: what each one's verified manifest means for
# this device, and the best of them. ota/updater.py runs the stage: for every source it calls
# ota/verify.py (fetch, envelope, signature) and then the functions here, each as a call of its
# own (ota._call), so this module, the manifest's checks and the slots are never in the heap
# beside Ed25519.
from binascii import hexlify
from hashlib import sha256
from ota.errors import OtaError, RELEASE, DEVICE


def _log(msg):
    print("ota: " + msg)


class Offer:
    # The release a source offers and what this device makes of it: m (the parsed manifest),
    # digest, url (of its manifest), payload_url, env (the envelope's SHA-256: the fleet's name
    # for the release), running (version), target (slot), install (bool), rejected (why, or
    # None), hold (None, or (code, detail): its rollout document holds it back; ota/rollout.py).
    hold = None


class Sources:
    # What the stage knows so far: the running image (version, anti-rollback floor, the slot
    # to write) and the best offers of each kind among the sources judged.
    best = same = seen = held = first_bad = last = None


def start(cfg, st):
    # Before any source is asked: whether this device may install at all, and what it runs.
    from ota import slots, otadata
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
    s = Sources()
    s.running, secure = slots.read_app_desc(run)
    # The anti-rollback floor: the newest confirmed release's counter, and never below what the
    # running image itself says (esp_app_desc_t.secure_version), whatever the state file holds.
    s.floor = max(st["floor"], secure)
    s.target = run.get_next_update()
    return s


def judge(cfg, st, s, url, env, body):
    # The Offer of the manifest `body` (verified: ota/verify.py) that the source `url` served.
    from ota.manifest import parse, decide
    o = Offer()
    o.m = parse(body)
    o.digest = hexlify(sha256(body).digest()).decode()
    o.url = url
    from ota.url import join  # here, not at the payload stage's peak
    o.payload_url = join(url, o.m.url)
    o.env = env
    o.running = s.running
    o.target = s.target
    o.install = decide(o.m, cfg, s.running, s.floor, s.target.info()[3])
    o.rejected = None
    for r in st["rejected"]:  # why it was rejected before (state.rejected_reason(), without ota.state)
        if r.get("digest") == o.digest:
            o.rejected = r.get("reason")
            break
    return o


def failed(cfg, s, url, e):
    # A source that failed (OtaError e) is only skipped: it cannot hide a good one after it.
    if len(cfg.manifest_urls) > 1:
        _log("%s: %s (%s)" % (url, e.code, e.detail))
    s.last = e
    if e.kind == RELEASE and s.first_bad is None:
        s.first_bad = e


def consider(cfg, s, url, o):
    # Keep o if it is the best so far: the highest version this device may install. A source
    # that offers nothing usable (the release we run, an older one, one for another board, one
    # we rejected) is only skipped. With a rollout role, an offer its rollout document holds
    # back (o.hold) is skipped too, but kept to be answered (skipped, with the code) when no
    # source offers anything to install; one held only by its maintenance window is
    # installable: the payload stage downloads it and waits for the window to set it to boot
    # (ota/install.py).
    many = len(cfg.manifest_urls) > 1
    if not o.install:
        s.same = s.same or o
    elif o.rejected:
        s.seen = s.seen or o
        if many:
            _log("%s: %s was rejected before (%s)" % (url, o.m.version, o.rejected))
    elif o.hold and o.hold[0] != "outside-window":
        s.held = s.held or o
        if many:
            _log("%s: %s held back: %s" % (url, o.m.version, o.hold[0]))
    else:
        best = s.best
        if best is None or o.m.version_t > best.m.version_t or (o.m.version_t == best.m.version_t and (
                (best.hold and not o.hold) or
                (bool(best.hold) == bool(o.hold) and getattr(o, "issued", 0) > getattr(best, "issued", 0)))):
            # the same release from two sources: the one whose rollout document is newer (a
            # lagging mirror's older document is superseded by it below anyway)
            s.best = o


def best(cfg, st, s):
    # The offer to install; else one that says we are up to date; else one we rejected before
    # (o.rejected: why); else raises the first bad release's error, or the last transport error.
    b = s.best
    if b and cfg.rollout_keys is not None and getattr(b, "issued", 0) < (st.get("rollout_seen") or 0):
        # Its rollout document was superseded by a newer one another source served in this same
        # check (a stale or replaying mirror listed before the origin, whose newer document may
        # halt the rollout): judged on that order alone, it would install past the halt. Held;
        # the next check refuses the older document as a replay.
        b.hold = ("rollout-replayed", "a newer rollout document was seen in this check")
        s.held = s.held or b
        b = None
    o = b or s.held or s.same or s.seen
    if o is None:
        raise s.first_bad or s.last
    return o
