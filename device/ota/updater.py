# ota.update() and ota.check(): the update in two stages, each with only its own code loaded.
#
#   1. the manifest stage (ota/offer.py): every source's signed manifest fetched into the block
#      buffer, verified (DSSE envelope, Ed25519, SHA-512), checked against this device; the best
#      offer kept. Its code is then dropped (MANIFEST_STAGE) and the heap collected:
#   2. the payload stage (ota/install.py, ota/payload.py for chunked payloads): the payload
#      streamed into the inactive slot, the slot read back and verified, set_boot().
#
# So the heap an update needs is the larger of the two stages, not their sum (docs/memory.md).
# Memory: one 4096-byte block buffer, taken by ota.update() before anything loads, serves both
# stages: the manifest, then each payload block, then each block read back.
from ota.errors import OtaError, RELEASE, TRANSPORT, DEVICE

# The manifest stage's modules, dropped before the payload stage.
MANIFEST_STAGE = ("ota.offer", "ota.envelope", "ota.ed25519", "ota.sha512", "ota.manifest")


def _log(msg):
    print("ota: " + msg)


def _offer(st, mv, source=None):
    # Stage 1, with its code loaded for it alone: (config, the best offer). Not even ota.state:
    # the caller has the state's dict and loads the module again after.
    import ota
    ota._drop(("ota.state",))
    try:
        from ota import config
        cfg = config.load()
        if source is not None:
            if not isinstance(source, str) or not source:
                raise OtaError("bad-url", "source must be a release URL or \"serial:\"", DEVICE)
            cfg.manifest_urls = [config.manifest_url(source)]
    finally:
        config = None
        ota._drop(("ota.config",))  # the Config object stays; the parser goes
    if cfg.announce:  # the device names itself in its manifest fetches (ota/ident.py)
        cfg.agent = ota._call("ident", "announce", cfg, st)
    from ota import http
    http.limit(_budget_ms(cfg))
    try:
        from ota.offer import offer
        return cfg, offer(cfg, st, mv)
    finally:
        offer = None
        ota._drop(MANIFEST_STAGE)


def _report(*args):
    # The fleet reports of this call (ota/report.py), if the device has a fleet server; never
    # raises. Made as it ends: the payload stage's code goes first (if it was loaded).
    import ota
    ota._drop(("ota.install", "ota.raw", "ota.payload", "ota.http", "ota.image"))
    ota._report(*args)


def _no_limit():
    import ota
    ota._until = None  # http.limit(None), without loading ota.http for it


def _budget_ms(cfg):
    # The whole update() call's deadline, from the config: each source's manifest within 4
    # timeouts (connect and TLS handshake: 2, headers: 1, body: 1), and a payload as large as the
    # slot at the minimum rate (4 KiB per 2 timeouts) with room for one interruption.
    from ota import slots
    blocks = slots.running().get_next_update().info()[3] // 4096
    return (len(cfg.manifest_urls) * 4 + blocks * 2 + 8) * cfg.timeout_s * 1000


def _progress_mark(st, digest):
    # How far the download of `digest` is (chunks, bytes), to tell a failure that got further.
    p = st.get("progress")
    if not p or p.get("digest") != digest:
        return (0, 0)
    return (p.get("chunk") or 0, p.get("done") or 0)


def check(buf):
    # What update() would do, without downloading the payload or changing any state.
    from ota import state
    st = state.load()
    state = None
    try:
        cfg, o = _offer(st, memoryview(buf))
    except OtaError as e:
        return {"update": False, "error": e.code, "detail": e.detail}
    except MemoryError:  # as in update(): a query must not take the application down
        return {"update": False, "error": "no-memory", "detail": "out of heap during the check"}
    except Exception as e:
        import sys
        sys.print_exception(e)
        return {"update": False, "error": "internal-error", "detail": repr(e)[:120]}
    finally:
        _no_limit()
    if o.install and o.rejected:
        return {"update": False, "version": o.m.version, "running": o.running, "error": "rejected",
                "detail": "release %s was rejected before: %s" % (o.m.version, o.rejected)}
    return {"update": o.install, "version": o.m.version, "running": o.running, "error": None,
            "detail": "" if o.install else "up to date"}


def update(buf, reboot, source=None):
    # source: a release URL used instead of the configured server and mirrors for this call,
    # or "serial:" for a release the host pushes over the serial link (mpota push).
    from ota import state
    st = state.load()
    state = None
    result = rec = None
    retry_after = None
    o = None
    try:
        mv = memoryview(buf)
        try:
            cfg, o = _offer(st, mv, source)
        finally:
            from ota import state
        why = o.rejected if o.install else None
        if why:
            state.record(st, "skipped", why, "release %s was rejected before (%s); not retrying" % (o.m.version, why))
            _log("release %s was rejected before (%s); not retrying" % (o.m.version, why))
        elif not o.install:
            state.record(st, "up-to-date", None, "running %s" % o.running)
            _log("up to date (%s)" % o.running)
        elif state.backoff_skip(st, o.digest):
            b = st["backoff"]
            state.record(st, "skipped", "backoff", "release %s failed %d time(s) in a row (last: %s); %d more "
                         "check(s) skip it" % (o.m.version, b["fails"], b.get("code"), b["skip"]))
            _log(st["detail"])
        else:
            mark = _progress_mark(st, o.digest)
            from ota.install import install
            try:
                install(cfg, st, o, mv)
            except OtaError as e:
                # Back off from a release whose attempts fail: a payload that does not verify, a
                # download that made no progress. A link that breaks while data still comes is not
                # held against it: the next check resumes where it stopped.
                if e.kind != TRANSPORT or _progress_mark(st, o.digest) <= mark:
                    state.backoff_fail(st, o.digest, o.m.version, e.code)
                raise
            result = "installed"  # the back-off ends when the image confirms itself (trial.py)
    except OtaError as e:
        retry_after = getattr(e, "retry_after", None)
        if e.code == "reboot-pending":
            rec = ("installed", e.code, e.detail)
            _log(e.detail + ("; resetting" if reboot else ""))
            result = "installed"
        else:
            rec = ("refused" if e.kind == RELEASE else "failed", e.code, e.detail)
            _log("%s: %s (%s)" % (rec[0], e.code, e.detail))
    except MemoryError as e:
        # Never let an update take the application down: report it and carry on.
        import sys
        sys.print_exception(e)
        rec = ("failed", "no-memory", "out of heap during the update")
        _log("failed: no-memory")
    except Exception as e:  # a bug of ours must not take the application down either
        import sys
        sys.print_exception(e)
        rec = ("failed", "internal-error", repr(e)[:120])
        _log("failed: internal-error %r" % (e,))
    _no_limit()
    if source and source.startswith("serial:"):
        import micropython
        micropython.kbd_intr(3)  # ota/link.py switched Ctrl-C off for the binary transfer
    if state is None:  # the heap ran out before ota.state was loaded again
        try:
            from ota import state
        except MemoryError:
            return None  # ota.update() records no-memory once this stage's modules are gone
    if rec:
        state.record(st, *rec)
    st["retry_after"] = retry_after  # seconds the server asked us to wait, or None
    e = state.save_or_log(st)  # the result is returned all the same
    if e and st["last_error"] is None:
        state.record(st, st["last_result"], e.code, e.detail)
    out = {"result": st["last_result"], "error": st["last_error"], "detail": st["detail"]}
    if retry_after is not None:
        out["retry_after"] = retry_after
    _report("result", st, o, buf)
    if result == "installed" and reboot:
        import machine
        machine.reset()
    return out
