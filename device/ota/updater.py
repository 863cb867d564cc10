# ota.update() (and ota.check(): ota/query.py): the update in two stages, each a call of its own with only its
# own code loaded (ota/__init__.py runs them one after the other, and forgets each stage's
# modules before the next):
#
#   1. the manifest stage (this module, ota/verify.py, ota/offer.py): every source's signed
#      manifest fetched into the block buffer, verified (DSSE envelope, Ed25519, SHA-512),
#      checked against this device; the best offer kept. begin() returns it, or the error, for
#      the second stage;
#   2. the payload stage (ota/apply.py; the download itself a call of its own, ota/download.py
#      with ota/raw.py or ota/payload.py; then ota/install.py): the offer installed or the
#      reason it was not, recorded, reported; the reset.
#
# So the heap an update needs is the larger of the two stages, not their sum (docs/memory.md);
# this module is the smaller one, and stage 2's code is not loaded during the signature check.
# Memory: one 4096-byte block buffer, taken by ota.update() before anything loads, serves both
# stages: the manifest, then each payload block, then each block read back.
from ota.errors import OtaError


def _offer(st, mv, source=None):
    # Stage 1: (config, the best offer). The config for this call and its deadline come from a
    # call of their own (ota/prepare.py); not even ota.state is loaded: the caller has the
    # state's dict and loads the module again after.
    import ota
    ota._drop(("ota.state",))
    cfg = ota._call("prepare", "for_call", st, source)
    return cfg, _sources(cfg, st, mv)


def _sources(cfg, st, mv):
    # Ask the server and every mirror, check each offer fully (signature, board, chip, version,
    # security floor, rejected before, its rollout document), and take the best (ota/offer.py's
    # rules). Each step is a call with only its own code loaded (ota._call): the signature check
    # (ota/verify.py) never shares the heap with the offer's checks, the slots or otadata.
    import ota
    call = ota._call
    s = call("offer", "start", cfg, st)
    for url in cfg.manifest_urls:
        try:
            env, msg, cands = call("verify", "manifest", cfg, url, mv)
            body = call("signature", "verified", msg, cands)
            msg = cands = None
            o = call("offer", "judge", cfg, st, s, url, env, body)
            env = body = None
            if o.install and not o.rejected and cfg.rollout_keys is not None:
                box = call("verify", "rollout", cfg, o, mv)
                if type(box) is list:  # [msg, cands]: the rollout document's signed body, for judge()
                    box = [call("signature", "verified", box.pop(0), box.pop(), "rollout-bad-signature",
                                "rollout.json: ")]
                o.hold = box if type(box) is tuple else call("rollout", "judge", cfg, st, o, box)
                box = None
        except OtaError as e:
            call("offer", "failed", cfg, s, url, e)
            continue
        call("offer", "consider", cfg, s, url, o)
        o = None
    return call("offer", "best", cfg, st, s)


def _no_limit():
    import ota
    ota._until = None  # http.limit(None), without loading ota.http for it


def begin(buf, source=None):
    # Stage 1 of update(): (state, config, offer, None), or (state, None, None, the error) for
    # stage 2 to record (ota/apply.py). source: a release URL used instead of the configured
    # server and mirrors for this call, or "serial:" for a release the host pushes over the
    # serial link (mpota push).
    from ota import state
    st = state.load()
    state = None
    try:
        cfg, o = _offer(st, memoryview(buf), source)
        return st, cfg, o, None
    except Exception as e:  # MemoryError too: an answer, recorded by the next stage
        return st, None, None, e
