# A raw payload (the image itself) into the inactive slot: ota/install.py loads this module for
# it (and ota/payload.py for a chunked one).
#
# Interruptions: the download position is saved every `progress_every` blocks; after a reset
# or a dropped connection the agent re-hashes what is already in the slot and continues with
# a Range request (a server answering 200 instead of 206 makes it start over). The payload's
# SHA-256 says only that something is wrong, not where: after a mismatch the next attempt
# starts over.
from micropython import const
import hashlib
from ota.errors import OtaError, RELEASE, TRANSPORT
from ota import body
from ota.download import Slot, _log, save_progress, first_block

_BLOCK = const(4096)
_IMAGE_MAGIC = const(0xE9)  # ota/image.py's IMAGE_MAGIC (not loaded for it)


class _Job:
    # One download into the target slot: where it is, and the payload hash so far.
    def __init__(self, o):
        self.o = o
        self.m = o.m
        self.done = 0
        self.h = hashlib.sha256()
        self.bad = None  # the first block's error, judged only once the payload's hash is known


def _rehash(job, mv, chip_id):
    # Resume: hash what an earlier attempt already wrote to the slot (and check its header,
    # whose magic byte is not in flash yet: see image.py).
    for b in range(job.done // _BLOCK):
        job.o.target.readblocks(b, mv, 0)
        if b == 0:
            mv[0] = _IMAGE_MAGIC
            first_block(mv, chip_id, job.m.version)
        job.h.update(mv)


def _download(cfg, job, mv, st, url):
    # Stream from job.done to the end; raises OtaError on failure with job.done at the last
    # block written (so the caller can resume from there).
    m, target = job.m, job.o.target
    resp = body.get(url, cfg.timeout_s, job.done, cfg.ca, mv)
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
        slot = Slot(target, job.o.big)
        while job.done < m.size:
            want = min(_BLOCK, m.size - job.done)
            got = body.read_full(resp, mv[:want])
            if got < want:
                raise OtaError("truncated", "payload ended after %d of %d bytes" % (job.done + got, m.size),
                               TRANSPORT if resp.length is not None else RELEASE)
            block = job.done // _BLOCK
            if block == 0:
                try:
                    first_block(mv, cfg.chip_id, m.version)
                except OtaError as e:
                    # Not the release's fault until the signed hash says these are its bytes:
                    # whoever served them could have changed them (and a refusal that blames
                    # the release counts against it in a rollout). The rest is hashed, not
                    # written; fetch() then says which it was.
                    job.bad = e
            job.h.update(mv[:got])
            if job.bad is not None:
                job.done += got
                continue
            if block == 0:
                mv[0] = 0xFF  # the magic byte goes in last (image.py)
            for i in range(got, _BLOCK):
                mv[i] = 0xFF  # the tail of the last block stays erased
            slot.write(block, mv, (m.size - job.done + _BLOCK - 1) // _BLOCK)
            job.done += got
            since_save += 1
            if since_save >= cfg.progress_every and job.done < m.size:
                save_progress(st, job.o, "done", job.done)
                since_save = 0
            if job.done >= mark or job.done == m.size:
                _log("written %d/%d bytes" % (job.done, m.size))
                mark += step
        if resp.length is None and body.read_full(resp, mv[:1]):
            raise OtaError("too-long", "payload continues past the declared %d bytes" % m.size)
    finally:
        resp.close()


def fetch(cfg, st, o, mv, url):
    m = o.m
    label = o.target.info()[4]
    job = _Job(o)
    prog = st.get("progress")
    if prog and prog.get("digest") == o.digest and prog.get("slot") == label:
        job.done = min(prog.get("done", 0), m.size) // _BLOCK * _BLOCK
    if job.done:
        _log("resuming %s at %d/%d bytes" % (m.version, job.done, m.size))
        _rehash(job, mv, cfg.chip_id)
    else:
        _log("installing %s over %s into %s (%d bytes)" % (m.version, o.running, label, m.size))

    def step():
        if job.done < m.size:
            _download(cfg, job, mv, st, url)
    try:
        body.resume(step, lambda: "%d bytes" % job.done)
        if job.h.digest() != m.sha256:
            raise OtaError("hash-mismatch", "payload SHA-256 differs from the signed manifest")
        if job.bad is not None:
            raise job.bad  # the signed payload itself: the release's fault
    except OtaError as e:
        if e.kind == TRANSPORT and job.bad is None:
            if job.done:
                save_progress(st, job.o, "done", job.done)  # kept for the next update() to resume from
        else:
            st["progress"] = None  # start over (nothing here is bootable: image.py)
        raise
