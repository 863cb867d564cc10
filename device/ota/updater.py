# ota.update() and ota.check(): fetch and verify the signed manifest, then stream the payload
# into the inactive slot, verify what is in flash, make it bootable and reset.
#
# Memory: one 4096-byte block buffer (taken by ota.update() before this module loads) holds
# the manifest, then each payload block on its way to flash, then each block read back.
# Nothing holds a whole image.
#
# Interruptions: the download position is saved every `progress_every` blocks; after a reset
# or a dropped connection the agent re-hashes what is already in the slot and continues with
# a Range request (a server answering 200 instead of 206 makes it start over).
from micropython import const
import hashlib
from binascii import hexlify
from ota.errors import OtaError, RELEASE, TRANSPORT, DEVICE
# Everything an update needs is imported here, up front: loading code while the heap is still
# unfragmented is what lets an update run in an ESP32-sized heap (see docs/memory.md).
from ota import state, http, slots, otadata
from ota.envelope import open_envelope
from ota.manifest import parse, decide
from ota.image import check_first_block
from ota.payload import Decoder

_BLOCK = const(4096)
_MANIFEST_MAX = const(4096)  # fits the block buffer


def _log(msg):
    print("ota: " + msg)


def _block_buffer(buf=None):
    # The one 4 KiB buffer of an update. Take it before imports and the signature check
    # fragment the heap: a 128 KiB heap can have 60 KiB free and no 4 KiB hole after them.
    if buf is None:
        import gc
        gc.collect()
        buf = bytearray(_BLOCK)
    return memoryview(buf)


def _fetch_manifest(cfg, url, mv):
    # Read the manifest into the block buffer `mv`; returns the filled slice. One byte more
    # than the buffer holds means the manifest is too large: it is refused, not read.
    resp = http.get(url, cfg.timeout_s, 0, cfg.ca)
    try:
        n = resp.length
        if n is not None and n > _MANIFEST_MAX:
            raise OtaError("manifest-too-large", "%d bytes > %d" % (n, _MANIFEST_MAX))
        got = http.read_full(resp, mv[:_MANIFEST_MAX], http.deadline(cfg.timeout_s))
        if got == _MANIFEST_MAX and http.read_full(resp, bytearray(1), http.deadline(cfg.timeout_s)):
            raise OtaError("manifest-too-large", "more than %d bytes" % _MANIFEST_MAX)
        if n is not None and got != n:
            raise OtaError("truncated", "manifest: %d of %d bytes" % (got, n), TRANSPORT)
        return mv[:got]
    finally:
        resp.close()


class Offer:
    # The release a server offers and what this device makes of it.
    pass


def _offer(cfg, st, mv):
    # Try the server, then each mirror, until one serves a manifest signed by a trusted key.
    # A mirror that fails (transport) or serves a bad release is skipped; if all fail, the
    # error reported is the first bad release's, else the last transport error.
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
    first_bad = last = None
    for url in cfg.manifest_urls:
        try:
            body = open_envelope(_fetch_manifest(cfg, url, mv), cfg.pubkeys)
            o = Offer()
            o.m = parse(body)
            o.digest = hexlify(hashlib.sha256(body).digest()).decode()
            o.url = url
            break
        except OtaError as e:
            if len(cfg.manifest_urls) > 1:
                _log("%s: %s (%s)" % (url, e.code, e.detail))
            last = e
            if e.kind == RELEASE and first_bad is None:
                first_bad = e
    else:
        raise first_bad or last
    o.running = slots.read_app_desc(run)[0]
    o.target = run.get_next_update()
    o.install = decide(o.m, cfg, o.running, st["floor"], o.target.info()[3])
    return o


def check(buf=None):
    # What update() would do, without downloading the payload or changing any state.
    from ota import config
    st = state.load()
    try:
        o = _offer(config.load(), st, _block_buffer(buf))
    except OtaError as e:
        return {"update": False, "error": e.code, "detail": e.detail}
    except MemoryError:  # as in update(): a query must not take the application down
        return {"update": False, "error": "no-memory", "detail": "out of heap during the check"}
    except Exception as e:
        import sys
        sys.print_exception(e)
        return {"update": False, "error": "internal-error", "detail": repr(e)[:120]}
    why = state.rejected_reason(st, o.digest)
    if why:
        return {"update": False, "version": o.m.version, "running": o.running, "error": "rejected",
                "detail": "release %s was rejected before: %s" % (o.m.version, why)}
    return {"update": o.install, "version": o.m.version, "running": o.running, "error": None,
            "detail": "" if o.install else "up to date"}


class _Job:
    # One download into the target slot: where it is, and the payload hash so far.
    def __init__(self, o):
        self.o = o
        self.m = o.m
        self.done = 0
        self.h = hashlib.sha256()


def _rehash(job, mv, chip_id):
    # Resume: hash what an earlier attempt already wrote to the slot (and check its header).
    for b in range(job.done // _BLOCK):
        job.o.target.readblocks(b, mv, 0)
        if b == 0:
            check_first_block(mv, chip_id, job.m.version)
        job.h.update(mv)


def _download(cfg, job, mv, st, url):
    # Stream from job.done to the end; raises OtaError on failure with job.done at the last
    # block written (so the caller can resume from there).
    m, target = job.m, job.o.target
    resp = http.get(url, cfg.timeout_s, job.done, cfg.ca)
    try:
        if job.done and resp.status == 200:
            # The server ignored Range: take the whole body from the start.
            _log("server ignored the Range request: starting over")
            job.done = 0
            job.h = hashlib.sha256()
        elif job.done and not resp.headers.get("content-range", "").startswith("bytes %d-" % job.done):
            raise OtaError("bad-response", "Content-Range %r for a request from %d"
                           % (resp.headers.get("content-range"), job.done), TRANSPORT)
        left = m.size - job.done
        if resp.length is not None and resp.length < left:
            raise OtaError("truncated", "server has %d bytes, manifest says %d" % (job.done + resp.length, m.size))
        if resp.length is not None and resp.length > left:
            raise OtaError("too-long", "server has %d bytes, manifest says %d" % (job.done + resp.length, m.size))
        step = max(m.size // 4, _BLOCK)
        mark = (job.done // step + 1) * step
        since_save = 0
        while job.done < m.size:
            want = min(_BLOCK, m.size - job.done)
            got = http.read_full(resp, mv[:want], http.deadline(cfg.timeout_s))
            if got < want:
                raise OtaError("truncated", "payload ended after %d of %d bytes" % (job.done + got, m.size),
                               TRANSPORT if resp.length is not None else RELEASE)
            block = job.done // _BLOCK
            if block == 0:
                check_first_block(mv, cfg.chip_id, m.version)
            job.h.update(mv[:got])
            for i in range(got, _BLOCK):
                mv[i] = 0xFF  # the tail of the last block stays erased
            target.writeblocks(block, mv)  # erases the block, then writes it
            job.done += got
            since_save += 1
            if since_save >= cfg.progress_every and job.done < m.size:
                _save_progress(st, job)
                since_save = 0
            if job.done >= mark or job.done == m.size:
                _log("written %d/%d bytes" % (job.done, m.size))
                mark += step
        if resp.length is None and http.read_full(resp, mv[:1], http.deadline(cfg.timeout_s)):
            raise OtaError("too-long", "payload continues past the declared %d bytes" % m.size)
    finally:
        resp.close()


def _save_progress(st, job):
    st["progress"] = {"digest": job.o.digest, "slot": job.o.target.info()[4], "done": job.done}
    state.save(st)


def _verify_flash(target, m, mv):
    # Read the slot back and hash exactly the image's bytes: what will boot is what was signed.
    h = hashlib.sha256()
    left = m.image_size
    block = 0
    while left:
        k = min(_BLOCK, left)
        target.readblocks(block, mv[:k], 0)
        h.update(mv[:k])
        left -= k
        block += 1
    if h.digest() != m.image_sha256:
        raise OtaError("flash-mismatch", "slot content differs from the signed image after writing", DEVICE)


def _install(cfg, st, o, mv, reserve=None):
    m, target = o.m, o.target
    label = target.info()[4]
    job = _Job(o)
    prog = st.get("progress")
    if prog and prog.get("digest") == o.digest and prog.get("slot") == label and m.chunks is None:
        job.done = min(prog.get("done", 0), m.size) // _BLOCK * _BLOCK
    if job.done:
        _log("resuming %s at %d/%d bytes" % (m.version, job.done, m.size))
        _rehash(job, mv, cfg.chip_id)
    else:
        _log("installing %s over %s into %s (%d bytes)" % (m.version, o.running, label, m.size))
    url = http.join(o.url, m.url)
    try:
        if m.chunks is None:
            def step():
                if job.done < m.size:
                    _download(cfg, job, mv, st, url)
            http.resume(step, lambda: "%d bytes" % job.done)
            if job.h.digest() != m.sha256:
                raise OtaError("hash-mismatch", "payload SHA-256 differs from the signed manifest")
        else:
            Decoder(cfg, o, st, mv, reserve).run(url)
        _verify_flash(target, m, mv)
    except OtaError as e:
        if e.kind == TRANSPORT:
            # Keep what is in the slot for the next update() to resume from (a chunked
            # payload's Decoder has saved its position already).
            if m.chunks is None and job.done:
                _save_progress(st, job)
        else:
            # Leave no bootable half-image behind: erase the first block (its header).
            st["progress"] = None
            try:
                target.ioctl(6, 0)
            except OSError:
                pass
        raise
    # Remember what we are about to boot before set_boot, so the next boot can tell a
    # confirmation from a rollback, or from a set_boot that power cut short. The progress
    # record stays, marking the download complete: a retry only re-checks the slot.
    sector = otadata.next_sector(otadata.records())
    st["progress"] = {"digest": o.digest, "slot": label, "done": m.size,
                      "chunk": len(m.chunks) if m.chunks else 0}
    st["pending"] = {"digest": o.digest, "version": m.version, "slot": label, "counter": m.counter,
                     "sector": sector, "from": slots.running().info()[4]}
    state.save(st)
    try:
        otadata.erase_sector(sector)
        target.set_boot()
    except OSError as e:
        # ESP-IDF refused the image we verified (esp_image_verify: e.g. a chip revision outside
        # the image's min/max): it would refuse it every time, so it is not downloaded again.
        st["pending"] = None
        st["progress"] = None
        state.reject(st, o.digest, m.version, "set-boot-failed")
        raise OtaError("set-boot-failed", "esp_ota_set_boot_partition refused %s: %r" % (m.version, e))
    state.record(st, "installed", None, "%s written to %s; rebooting to confirm" % (m.version, label))
    state.save_or_log(st)  # set to boot and "pending" recorded: only this note can be lost
    _log("%s verified in flash and set to boot" % m.version)


def update(reboot=True, buf=None, reserve=None, source=None):
    # source: a release URL used instead of the configured server and mirrors for this call,
    # or "serial:" for a release the host pushes over the serial link (mpota push).
    from ota import config
    st = state.load()
    result = None
    retry_after = None
    try:
        mv = _block_buffer(buf)
        cfg = config.load()
        if source is not None:
            if not isinstance(source, str) or not source:
                raise OtaError("bad-url", "source must be a release URL or \"serial:\"", DEVICE)
            cfg.manifest_urls = [config.manifest_url(source)]
        o = _offer(cfg, st, mv)
        why = state.rejected_reason(st, o.digest)
        if why:
            state.record(st, "skipped", why, "release %s was rejected before (%s); not retrying" % (o.m.version, why))
            _log("release %s was rejected before (%s); not retrying" % (o.m.version, why))
        elif not o.install:
            state.record(st, "up-to-date", None, "running %s" % o.running)
            _log("up to date (%s)" % o.running)
        else:
            _install(cfg, st, o, mv, reserve)
            result = "installed"
    except OtaError as e:
        retry_after = getattr(e, "retry_after", None)
        if e.code == "reboot-pending":
            state.record(st, "installed", e.code, e.detail)
            _log(e.detail + ("; resetting" if reboot else ""))
            result = "installed"
        else:
            state.record(st, "refused" if e.kind == RELEASE else "failed", e.code, e.detail)
            _log("%s: %s (%s)" % ("refused" if e.kind == RELEASE else "failed", e.code, e.detail))
    except MemoryError as e:
        # Never let an update take the application down: report it and carry on.
        import sys
        sys.print_exception(e)
        state.record(st, "failed", "no-memory", "out of heap during the update")
        _log("failed: no-memory")
    except Exception as e:  # a bug of ours must not take the application down either
        import sys
        sys.print_exception(e)
        state.record(st, "failed", "internal-error", repr(e)[:120])
        _log("failed: internal-error %r" % (e,))
    if source and source.startswith("serial:"):
        import micropython
        micropython.kbd_intr(3)  # ota/link.py switched Ctrl-C off for the binary transfer
    st["retry_after"] = retry_after  # seconds the server asked us to wait, or None
    e = state.save_or_log(st)  # the result is returned all the same
    if e and st["last_error"] is None:
        state.record(st, st["last_result"], e.code, e.detail)
    out = {"result": st["last_result"], "error": st["last_error"], "detail": st["detail"]}
    if retry_after is not None:
        out["retry_after"] = retry_after
    if result == "installed" and reboot:
        import machine
        machine.reset()
    return out
