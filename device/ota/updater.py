# ota.update() and ota.check(): fetch and verify the signed manifest, then stream the payload
# into the inactive slot, verify what is in flash, make it bootable and reset.
#
# Memory: the manifest is read into one buffer of at most _MANIFEST_MAX bytes; the payload
# streams through one 4096-byte block buffer (one flash erase block), which feeds both the
# SHA-256 and the flash. Nothing holds a whole image.
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

_BLOCK = const(4096)
_MANIFEST_MAX = const(4096)  # fits the block buffer


def _block_buffer(buf=None):
    # The one 4 KiB buffer of an update. Take it before imports and the signature check
    # fragment the heap: a 128 KiB heap can have 60 KiB free and no 4 KiB hole after them.
    if buf is None:
        import gc
        gc.collect()
        buf = bytearray(_BLOCK)
    return memoryview(buf)


def _log(msg):
    print("ota: " + msg)


def _fetch_manifest(cfg, mv):
    # Read the manifest into the block buffer `mv`; returns the filled slice. One byte more
    # than the buffer holds means the manifest is too large: it is refused, not read.
    resp = http.get(cfg.manifest_url, cfg.timeout_s)
    try:
        n = http.content_length(resp)
        if n is not None and n > _MANIFEST_MAX:
            raise OtaError("manifest-too-large", "%d bytes > %d" % (n, _MANIFEST_MAX))
        got = http.readinto_full(resp.raw, mv[:_MANIFEST_MAX])
        if got == _MANIFEST_MAX and http.readinto_full(resp.raw, bytearray(1)):
            raise OtaError("manifest-too-large", "more than %d bytes" % _MANIFEST_MAX)
        if n is not None and got != n:
            raise OtaError("truncated", "manifest: %d of %d bytes" % (got, n), TRANSPORT)
        return mv[:got]
    finally:
        resp.close()


def _plan(cfg, st, mv):
    # -> (manifest, digest_hex, install?, running version, target slot) for the release the
    # server offers. `mv` is the block buffer, used here to hold the manifest.
    all_slots = slots.ota_slots()
    run = slots.running()
    act = otadata.active(len(all_slots), otadata.records())
    if act is not None and act[1] == "PENDING_VERIFY" and slots.index_of(run, all_slots) == act[0]:
        # Writing the other slot now would overwrite the image we would roll back to.
        raise OtaError("not-confirmed", "this image is still on trial: call ota.confirm() first", DEVICE)
    body = open_envelope(_fetch_manifest(cfg, mv), cfg.pubkeys)
    digest = hexlify(hashlib.sha256(body).digest()).decode()
    m = parse(body)
    version = slots.read_app_desc(run)[0]
    target = run.get_next_update()
    install = decide(m, cfg, version, st["floor"], target.info()[3])
    return m, digest, install, version, target


def check():
    # What update() would do, without downloading the payload or changing any state.
    from ota import config
    st = state.load()
    try:
        cfg = config.load()
        m, digest, install, running, _t = _plan(cfg, st, _block_buffer())
    except OtaError as e:
        return {"update": False, "error": e.code, "detail": e.detail}
    why = state.rejected_reason(st, digest)
    if why:
        return {"update": False, "version": m.version, "running": running, "error": "rejected",
                "detail": "release %s was rejected before: %s" % (m.version, why)}
    return {"update": install, "version": m.version, "running": running, "error": None,
            "detail": "" if install else "up to date"}


def _stream(cfg, m, target, mv):
    # Download the payload into `target` block by block through `mv`; returns the image's
    # secure_version.
    url = cfg.base_url + m.url
    resp = http.get(url, cfg.timeout_s)
    try:
        n = http.content_length(resp)
        if n is not None and n < m.size:
            raise OtaError("truncated", "server has %d bytes, manifest says %d" % (n, m.size))
        if n is not None and n > m.size:
            raise OtaError("too-long", "server has %d bytes, manifest says %d" % (n, m.size))
        h = hashlib.sha256()
        done = 0
        block = 0
        secure = 0
        step = max(m.size // 4, _BLOCK)
        mark = step
        while done < m.size:
            want = min(_BLOCK, m.size - done)
            got = http.readinto_full(resp.raw, mv[:want])
            if got < want:
                raise OtaError("truncated", "payload ended after %d of %d bytes" % (done + got, m.size),
                               TRANSPORT if n is not None else RELEASE)
            if block == 0:
                secure = check_first_block(mv[:got], cfg.chip_id, m.version)
            h.update(mv[:got])
            if got < _BLOCK:
                for i in range(got, _BLOCK):
                    mv[i] = 0xFF  # the tail of the last block stays erased
            target.writeblocks(block, mv)  # erases the block, then writes it
            block += 1
            done += got
            if done >= mark or done == m.size:
                _log("written %d/%d bytes" % (done, m.size))
                mark += step
        if n is None and http.readinto_full(resp.raw, mv[:1]):
            raise OtaError("too-long", "payload continues past the declared %d bytes" % m.size)
        if h.digest() != m.sha256:
            raise OtaError("hash-mismatch", "payload SHA-256 differs from the signed manifest")
        return secure
    finally:
        resp.close()


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


def _install(cfg, st, m, digest, running, target, mv):
    label = target.info()[4]
    _log("installing %s over %s into %s (%d bytes)" % (m.version, running, label, m.size))
    try:
        _stream(cfg, m, target, mv)
        _verify_flash(target, m, mv)
    except OtaError:
        # Leave no bootable half-image behind: erase the first block (its header).
        try:
            target.ioctl(6, 0)
        except OSError:
            pass
        raise
    # Remember what we are about to boot before set_boot, so the next boot can tell a
    # confirmation from a rollback even if power fails in between.
    st["pending"] = {"digest": digest, "version": m.version, "slot": label, "counter": m.counter}
    state.save(st)
    try:
        target.set_boot()
    except OSError as e:
        st["pending"] = None
        raise OtaError("set-boot-failed", "esp_ota_set_boot_partition: %r" % (e,), DEVICE)
    state.record(st, "installed", None, "%s written to %s; rebooting to confirm" % (m.version, label))
    state.save(st)
    _log("%s verified in flash and set to boot" % m.version)


def update(reboot=True, buf=None):
    from ota import config
    st = state.load()
    result = None
    try:
        mv = _block_buffer(buf)
        cfg = config.load()
        m, digest, install, running, target = _plan(cfg, st, mv)
        why = state.rejected_reason(st, digest)
        if why:
            state.record(st, "skipped", why, "release %s was rejected before (%s); not retrying" % (m.version, why))
            _log("release %s was rejected before (%s); not retrying" % (m.version, why))
        elif not install:
            state.record(st, "up-to-date", None, "running %s" % running)
            _log("up to date (%s)" % running)
        else:
            _install(cfg, st, m, digest, running, target, mv)
            result = "installed"
    except OtaError as e:
        state.record(st, "refused" if e.kind == RELEASE else "failed", e.code, e.detail)
        _log("%s: %s (%s)" % ("refused" if e.kind == RELEASE else "failed", e.code, e.detail))
    except MemoryError as e:
        # Never let an update take the application down: report it and carry on.
        import sys
        sys.print_exception(e)
        state.record(st, "failed", "no-memory", "out of heap during the update")
        _log("failed: no-memory")
    state.save(st)
    out = {"result": st["last_result"], "error": st["last_error"], "detail": st["detail"]}
    if result == "installed" and reboot:
        import machine
        machine.reset()
    return out
