# The payload stage of an update: stream the payload into the inactive slot (raw here, chunked
# through ota.payload), verify what is in flash, make it bootable. Loaded after the manifest
# stage's code is gone (see updater.py).
#
# Memory: the update's one 4096-byte block buffer holds each payload block on its way to flash,
# then each block read back. Nothing holds a whole image.
#
# Interruptions: the download position is saved every `progress_every` blocks; after a reset
# or a dropped connection the agent re-hashes what is already in the slot and continues with
# a Range request (a server answering 200 instead of 206 makes it start over).
from micropython import const
import hashlib
from ota.errors import OtaError, RELEASE, TRANSPORT, DEVICE
from ota import state, http, slots, otadata
from ota.image import check_first_block, IMAGE_MAGIC

_BLOCK = const(4096)


def _log(msg):
    print("ota: " + msg)


class _Job:
    # One download into the target slot: where it is, and the payload hash so far.
    def __init__(self, o):
        self.o = o
        self.m = o.m
        self.done = 0
        self.h = hashlib.sha256()


def _rehash(job, mv, chip_id):
    # Resume: hash what an earlier attempt already wrote to the slot (and check its header,
    # whose magic byte is not in flash yet: see image.py).
    for b in range(job.done // _BLOCK):
        job.o.target.readblocks(b, mv, 0)
        if b == 0:
            mv[0] = IMAGE_MAGIC
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
            got = http.read_full(resp, mv[:want])
            if got < want:
                raise OtaError("truncated", "payload ended after %d of %d bytes" % (job.done + got, m.size),
                               TRANSPORT if resp.length is not None else RELEASE)
            block = job.done // _BLOCK
            if block == 0:
                check_first_block(mv, cfg.chip_id, m.version)
            job.h.update(mv[:got])
            if block == 0:
                mv[0] = 0xFF  # the magic byte goes in last (image.py)
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
        if resp.length is None and http.read_full(resp, mv[:1]):
            raise OtaError("too-long", "payload continues past the declared %d bytes" % m.size)
    finally:
        resp.close()


def _save_progress(st, job):
    st["progress"] = {"digest": job.o.digest, "slot": job.o.target.info()[4], "done": job.done}
    state.save(st)


def _verify_flash(target, m, mv):
    # Read the slot back and hash exactly the image's bytes: what will boot is what was signed.
    # The image's magic byte is still erased (0xFF): it is hashed as the 0xE9 it must be, then
    # written (a write without erase may only clear bits: 0xFF -> 0xE9) and read back. Only now
    # does the slot hold something a bootloader would take for an app image.
    h = hashlib.sha256()
    left = m.image_size
    block = 0
    while left:
        k = min(_BLOCK, left)
        target.readblocks(block, mv[:k], 0)
        if block == 0:
            if mv[0] != 0xFF and mv[0] != IMAGE_MAGIC:
                raise OtaError("flash-mismatch", "the slot's first byte is 0x%02x" % mv[0], DEVICE)
            mv[0] = IMAGE_MAGIC
        h.update(mv[:k])
        left -= k
        block += 1
    if h.digest() != m.image_sha256:
        raise OtaError("flash-mismatch", "slot content differs from the signed image after writing", DEVICE)
    one = mv[:1]
    one[0] = IMAGE_MAGIC
    target.writeblocks(0, one, 0)
    target.readblocks(0, one, 0)
    if one[0] != IMAGE_MAGIC:
        raise OtaError("flash-mismatch", "the image's magic byte did not reach the flash", DEVICE)


def install(cfg, st, o, mv):
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
            from ota.payload import Decoder
            Decoder(cfg, o, st, mv).run(url)
        _verify_flash(target, m, mv)
    except OtaError as e:
        if e.kind == TRANSPORT:
            # Keep what is in the slot for the next update() to resume from (a chunked
            # payload's Decoder has saved its position already).
            if m.chunks is None and job.done:
                _save_progress(st, job)
        elif m.chunks is None:
            # A raw payload's hash says only that something is wrong, not where: the next
            # attempt starts over. (A chunked payload keeps the chunks that verified: its
            # Decoder saved the position of the failing one.) Nothing here is bootable: the
            # image's magic byte is written only after the whole slot has verified.
            st["progress"] = None
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
