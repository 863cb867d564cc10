# Stage 2 of ota.update() (stage 1: ota/updater.py): the offer the manifest stage found is
# installed (ota/install.py), or why not is recorded; the result is saved, reported to the fleet
# server (if any) and returned; after an install ota.update() resets, once this stage is gone.
# Loaded only after stage 1's code (Ed25519, SHA-512, the envelope and manifest parsers) is gone.
import ota
from ota.errors import OtaError, RELEASE, TRANSPORT


def _log(msg):
    print("ota: " + msg)


def _progress_mark(st, digest):
    # How far the download of `digest` is (chunks, bytes), to tell a failure that got further.
    p = st.get("progress")
    if not p or p.get("digest") != digest:
        return (0, 0)
    return (p.get("chunk") or 0, p.get("done") or 0)


def update(buf, begun, reboot, fetched=None):
    # begun: what stage 1 returned (updater.begin). Returns the result, or "fetch" when the
    # payload is to be downloaded first: ota.update() then runs ota/download.py as a call of its
    # own and calls this again with fetched = (None,) or (the exception that stopped it,).
    st, cfg, o, err = begun
    begun = None
    from ota import state
    rec = None
    retry_after = None
    again = False  # downloaded and verified by an earlier check: only read back and set to boot
    try:
        if err is not None:
            raise err
        mv = memoryview(buf)
        why = o.rejected if o.install else None
        if fetched is not None:
            pass  # the download ran: its outcome is judged below
        elif why:
            state.record(st, "skipped", why, "release %s was rejected before (%s); not retrying" % (o.m.version, why))
            _log("release %s was rejected before (%s); not retrying" % (o.m.version, why))
        elif not o.install:
            state.record(st, "up-to-date", None, "running %s" % o.running)
            _log("up to date (%s)" % o.running)
        elif o.hold and o.hold[0] != "outside-window":
            # Held back by the rollout document (docs/rollout.md): not a failure of the release,
            # no back-off, nothing rejected; the next check asks again.
            state.record(st, "skipped", o.hold[0], "%s: %s" % (o.m.version, o.hold[1]))
            _log("%s held back: %s (%s)" % (o.m.version, o.hold[0], o.hold[1]))
        elif state.backoff_skip(st, o.digest):
            b = st["backoff"]
            state.record(st, "skipped", "backoff", "release %s failed %d time(s) in a row (last: %s); %d more "
                         "check(s) skip it" % (o.m.version, b["fails"], b.get("code"), b["skip"]))
            _log(st["detail"])
        else:
            o.mark = _progress_mark(st, o.digest)
            p = st.get("progress")
            again = p and p.get("verified") and p.get("digest") == o.digest and p.get("slot") == o.target.info()[4]
            if not again:
                return "fetch"
            fetched = (None,)
        if fetched is not None:
            from ota.install import install
            try:
                if fetched[0] is not None:
                    raise fetched[0]
                install(cfg, st, o, mv, again)
            except OtaError as e:
                # Back off from a release whose attempts fail: a payload that does not verify, a
                # download that made no progress. A link that breaks while data still comes is not
                # held against it: the next check resumes where it stopped.
                if e.kind != TRANSPORT or _progress_mark(st, o.digest) <= o.mark:
                    state.backoff_fail(st, o.digest, o.m.version, e.code)
                raise
            if o.hold:  # outside-window: in the slot and verified; set to boot by a check inside it
                state.record(st, "skipped", o.hold[0], "%s is verified in %s and boots at a check inside the "
                             "maintenance window (%s)" % (o.m.version, o.target.info()[4], o.hold[1]))
                _log("%s: %s" % (o.hold[0], st["detail"]))
            # else set to boot (ota._set_to_boot): the back-off ends when the image confirms
            # itself (trial.py), and ota.update() makes the reset
    except OtaError as e:
        retry_after = getattr(e, "retry_after", None)
        if e.code == "reboot-pending":
            rec = ("installed", e.code, e.detail)
            _log(e.detail + ("; resetting" if reboot else ""))
            ota._set_to_boot = True
        else:
            rec = ("refused" if e.kind == RELEASE else "failed", e.code, e.detail)
            _log("%s: %s (%s)" % (rec[0], e.code, e.detail))
    except MemoryError as e:
        # Never let an update take the application down: report it and carry on.
        import sys
        sys.print_exception(e)
        if ota._set_to_boot:  # after set_boot(): installed all the same, and the reset comes
            rec = ("installed", None, "set to boot; rebooting to confirm")
        else:
            rec = ("failed", "no-memory", "out of heap during the update")
            _log("failed: no-memory")
    except Exception as e:  # a bug of ours must not take the application down either
        import sys
        sys.print_exception(e)
        rec = ("failed", "internal-error", repr(e)[:120])
        _log("failed: internal-error %r" % (e,))
    ota._until = None  # the call's deadline (http.limit) ends with it
    # the payload stage's code goes first (if it was loaded): the state's saves and the fleet
    # reports of this call come after it
    ota._drop(("ota.install", "ota.otadata", "ota.slots"))
    if rec:
        state.record(st, *rec)
    st["retry_after"] = retry_after  # seconds the server asked us to wait, or None
    e = state.save_or_log(st)  # the result is returned all the same
    if e and st["last_error"] is None:
        state.record(st, st["last_result"], e.code, e.detail)
    out = {"result": st["last_result"], "error": st["last_error"], "detail": st["detail"]}
    if retry_after is not None:
        out["retry_after"] = retry_after
    ota._report("result", st, o, buf)  # if the device has a fleet server (ota/report.py); never raises
    return out  # and if set to boot, ota.update() resets once this stage's code is gone
