# Chunked payloads: compressed (raw deflate, small window) and/or encrypted (AES-256-CBC).
#
# The release tool cuts the image into chunks of `chunk` bytes (a multiple of 4096, so chunk
# boundaries are flash block boundaries). Each chunk is compressed as its own raw-deflate
# stream and/or encrypted on its own (CBC, IV derived from the release IV and the chunk
# index), so a download can resume at any chunk boundary with a Range request. The signed
# manifest lists every chunk's payload size and SHA-256 (first 16 bytes), so each chunk is
# authenticated as it arrives; a chunk that fails is erased with the slot's header, and the
# whole image is hashed again from flash before it can be set to boot.
#
# Memory: the block buffer of the update, a 512-byte staging buffer for decryption, and the
# deflate window (2^wbits bytes, 1 KiB for the default wbits=10).
from micropython import const
import hashlib
import io
from ota.errors import OtaError, TRANSPORT
from ota import body

_BLOCK = const(4096)
_STAGE = const(512)


def _chunk_iv(iv, k):
    # Per-chunk CBC IV: the release's random IV with its last 4 bytes XORed with the index.
    out = bytearray(iv)
    for i in range(4):
        out[15 - i] ^= (k >> (8 * i)) & 0xFF
    return out


class _ChunkReader(io.IOBase):
    # The payload bytes of one chunk as a stream: hashes them (as sent), decrypts them,
    # and ends exactly at the chunk's end so the decompressor cannot read into the next.
    def __init__(self, resp, size, aes, stage):
        self.resp = resp
        self.left = size
        self.aes = aes
        self.stage = stage
        self.pos = 0
        self.end = 0
        self.h = hashlib.sha256()

    def _fill(self, mv):
        # Every read is held to the response's minimum rate (ota.body.rate_deadline), counted
        # from the start of the response: small reads do not each get a fresh deadline.
        n = min(len(mv), self.left)
        got = body.read_full(self.resp, mv[:n])
        if got < n:
            raise OtaError("truncated", "payload ended inside a chunk", TRANSPORT)
        self.h.update(mv[:n])
        self.left -= n
        return n

    def readinto(self, b):
        if self.aes is None:
            return self._fill(memoryview(b)) if self.left else 0
        if self.pos == self.end:
            if not self.left:
                return 0
            mv = memoryview(self.stage)
            n = self._fill(mv)
            self.aes.decrypt(mv[:n], mv[:n])
            self.pos, self.end = 0, n
        n = min(len(b), self.end - self.pos)
        b[:n] = memoryview(self.stage)[self.pos:self.pos + n]
        self.pos += n
        return n

    def finish(self, expected):
        # Read what the decoder left (padding), then check the chunk's digest.
        junk = bytearray(16)
        while self.left:
            self._fill(memoryview(junk))
        return self.h.digest()[:16] == expected


class Decoder:
    def __init__(self, cfg, offer, st, mv):
        self.cfg = cfg
        self.o = offer
        self.m = offer.m
        self.st = st
        self.mv = mv
        self.stage = None  # taken after the first response's headers: not beside the HTTP request's code

    def _aes(self, k):
        if self.m.aes_key is None:
            return None
        import cryptolib
        return cryptolib.aes(self.m.aes_key, 2, _chunk_iv(self.m.iv, k))  # 2: CBC

    def run(self, url):
        m = self.m
        label = self.o.target.info()[4]
        prog = self.st.get("progress")
        k = 0
        if prog and prog.get("digest") == self.o.digest and prog.get("slot") == label:
            k = min(prog.get("chunk", 0), m.chunks)
        if k:
            print("ota: resuming %s at chunk %d/%d" % (m.version, k, m.chunks))
        else:
            print("ota: installing %s over %s into %s (%d bytes)" % (m.version, self.o.running, label, m.size))
        self.k = k

        def step():
            if self.k < m.chunks:
                try:
                    self.k = self._fetch(url, self.k)
                except OtaError as e:
                    if e.chunk is not None:
                        self.k = e.chunk
                    self._save(self.k)  # kept for the next update() if this one gives up
                    raise
        body.resume(step, lambda: "chunk %d" % self.k)

    def _save(self, k):
        from ota.download import save_progress
        save_progress(self.st, self.o, "chunk", k)

    def _fetch(self, url, k):
        # Download chunks k.. to the end; returns m.chunks (their number). On failure the OtaError
        # carries .chunk: the first chunk not yet complete.
        m, cfg = self.m, self.cfg
        from ota.download import Slot
        self.slot = Slot(self.o.target, self.o.big)  # per connection: only its own erases are trusted
        offset = 0
        for i in range(k):
            offset += m.chunk_sizes[i]
        try:
            resp = body.get(url, cfg.timeout_s, offset, cfg.ca, self.mv)
        except OtaError as e:
            e.chunk = k
            raise
        try:
            if self.m.aes_key and self.stage is None:
                self.stage = bytearray(_STAGE)
            if offset and resp.status == 200:
                print("ota: server ignored the Range request: starting over")
                k = 0
                offset = 0
            elif offset and not resp.headers.get("content-range", "").startswith("bytes %d-" % offset):
                # the server's fault, not the release's: keep the chunks we have
                raise OtaError("bad-response", "Content-Range %r for a request from %d"
                               % (resp.headers.get("content-range"), offset), TRANSPORT)
            if resp.length is not None and resp.length != m.size - offset:
                raise OtaError("truncated" if resp.length < m.size - offset else "too-long",
                               "server has %d bytes from %d, manifest says %d" % (resp.length, offset, m.size))
            since_save = 0
            while k < m.chunks:
                self._chunk(resp, k)
                k += 1
                since_save += m.chunk // _BLOCK
                if since_save >= cfg.progress_every and k < m.chunks:
                    self._save(k)
                    since_save = 0
            if resp.length is None and body.read_full(resp, self.mv[:1]):
                raise OtaError("too-long", "payload continues past the declared %d bytes" % m.size)
            return k
        except OtaError as e:
            e.chunk = k
            raise
        finally:
            resp.close()

    def _chunk(self, resp, k):
        m, mv = self.m, self.mv
        size = m.chunk_sizes[k]
        digest = memoryview(m.chunk_digests)[16 * k:16 * k + 16]
        import gc
        gc.collect()  # the previous chunk's reader, cipher and window go before the next's come
        reader = _ChunkReader(resp, size, self._aes(k), self.stage)
        src = reader
        if m.encoding == "deflate":
            import deflate
            src = deflate.DeflateIO(reader, deflate.RAW, m.wbits)
        out = min(m.chunk, m.image_size - k * m.chunk)
        block = k * m.chunk // _BLOCK
        slot = self.slot
        try:
            while out:
                want = min(_BLOCK, out)
                got = _read(src, mv[:want])
                if got < want:
                    raise OtaError("bad-payload", "chunk %d decodes to too few bytes" % k)
                if block == 0:
                    from ota.download import first_block
                    first_block(mv, self.cfg.chip_id, m.version)
                    mv[0] = 0xFF  # the magic byte goes in last (image.py)
                for i in range(got, _BLOCK):
                    mv[i] = 0xFF
                slot.write(block, mv, (m.image_size - block * _BLOCK + _BLOCK - 1) // _BLOCK)
                block += 1
                out -= got
            if m.encoding == "deflate" and _read(src, mv[:1]):
                raise OtaError("bad-payload", "chunk %d decodes to too many bytes" % k)
        except (OSError, ValueError, OtaError) as e:
            # Judge the chunk by its signed digest first: a tampered chunk is hash-mismatch
            # even when the damage also broke decompression or the image header.
            if isinstance(e, OtaError) and e.kind == TRANSPORT:
                raise
            if not reader.finish(digest):
                raise OtaError("hash-mismatch", "chunk %d differs from the signed manifest" % k)
            if isinstance(e, OtaError):
                raise
            raise OtaError("bad-payload", "chunk %d does not decode: %r" % (k, e))
        if not reader.finish(digest):
            raise OtaError("hash-mismatch", "chunk %d differs from the signed manifest" % k)


def _read(src, mv):
    n = 0
    while n < len(mv):
        k = src.readinto(mv[n:])
        if not k:
            break
        n += k
    return n


def fetch(cfg, st, o, mv, url):
    # ota/install.py's entry: a chunked payload into the slot. Its position is saved as it goes
    # (on any failure too: the chunks that verified are kept).
    Decoder(cfg, o, st, mv).run(url)
