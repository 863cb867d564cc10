# The signed manifest body: parse and check it against this device. Bytes in, no I/O.
from ota import jsonfile
from binascii import unhexlify
from ota.errors import OtaError

SCHEMA = 1
# Fields this agent understands; a release that lists any other field in "critical" is
# refused (like MCUboot's unknown protected TLVs): it relies on something we cannot check.
KNOWN = ("schema", "version", "board", "chip", "security_counter", "image", "payload",
         "critical", "created_by", "issued")
ENCODINGS = ("raw", "deflate")
_CHUNKS_MAX = 512


def _need(cond, field):
    if not cond:
        raise OtaError("bad-manifest", "field %s is missing or malformed" % field)


def _digest(obj, field):
    h = obj.get("sha256")
    _need(isinstance(h, str) and len(h) == 64, field + ".sha256")
    try:
        return unhexlify(h)
    except ValueError:
        raise OtaError("bad-manifest", "field %s.sha256 is not hex" % field)


def _size(obj, field):
    n = obj.get("size")
    _need(isinstance(n, int) and 0 < n < 0x40000000, field + ".size")
    return n


def _chunks(r, pay):
    # Chunked payloads (compressed or encrypted): `chunk` image bytes per chunk, and per chunk
    # [payload size, first 16 bytes of its SHA-256 in hex]. Sizes must add up exactly.
    r.chunk = pay.get("chunk")
    _need(isinstance(r.chunk, int) and r.chunk % 4096 == 0 and 4096 <= r.chunk <= 0x100000, "payload.chunk")
    r.wbits = pay.get("wbits", 10)
    _need(isinstance(r.wbits, int) and 9 <= r.wbits <= 15, "payload.wbits")
    chunks = pay.get("chunks")
    _need(isinstance(chunks, list) and 0 < len(chunks) <= _CHUNKS_MAX, "payload.chunks")
    _need(len(chunks) == (r.image_size + r.chunk - 1) // r.chunk, "payload.chunks (count)")
    total = 0
    out = []
    for c in chunks:
        _need(isinstance(c, list) and len(c) == 2 and isinstance(c[0], int) and 0 < c[0] < 0x40000000
              and isinstance(c[1], str) and len(c[1]) == 32, "payload.chunks entry")
        if r.enc_keyid is not None:
            _need(c[0] % 16 == 0, "payload.chunks entry (AES block size)")
        try:
            out.append((c[0], unhexlify(c[1])))
        except ValueError:
            _need(False, "payload.chunks digest")
        total += c[0]
    _need(total == r.size, "payload.chunks (sizes add up to payload.size)")
    r.chunks = out


def parse_version(text):
    # "1.2.3" / "v1.2.3" -> (1, 2, 3); None if it is not of that form. Parts stay below 10^9
    # so every comparison uses small ints, also with the ESP32's 31-bit ones.
    if not isinstance(text, str):
        return None
    if text[:1] in ("v", "V"):
        text = text[1:]
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    out = []
    for p in parts:
        if not p or len(p) > 9 or not p.isdigit():
            return None
        out.append(int(p))
    while len(out) < 4:
        out.append(0)  # "2.0" == "2.0.0"
    return tuple(out)


def running_version(text):
    # A running firmware's version may carry a suffix ("v1.24.1-dirty"): compare its numbers.
    if not text:
        return (0,)
    head = text.split("-")[0].split("+")[0]
    return parse_version(head) or (0,)


class Manifest:
    pass


def parse(body):
    try:
        m = jsonfile.loads(body)
    except (ValueError, TypeError):
        raise OtaError("bad-manifest", "signed payload is not JSON")
    _need(isinstance(m, dict), "(body)")
    _need(m.get("schema") == SCHEMA, "schema")
    crit = m.get("critical", [])
    _need(isinstance(crit, list), "critical")
    for c in crit:
        if c not in KNOWN:
            raise OtaError("unsupported-critical", "release needs %r, which this agent does not know" % (c,))
    r = Manifest()
    r.version = m.get("version")
    r.version_t = parse_version(r.version)
    _need(r.version_t is not None, "version")
    r.board = m.get("board")
    r.chip = m.get("chip")
    _need(isinstance(r.board, str), "board")
    _need(isinstance(r.chip, str), "chip")
    r.counter = m.get("security_counter", 0)
    _need(isinstance(r.counter, int) and 0 <= r.counter < 0x40000000, "security_counter")
    img = m.get("image")
    pay = m.get("payload")
    _need(isinstance(img, dict), "image")
    _need(isinstance(pay, dict), "payload")
    r.image_size = _size(img, "image")
    r.image_sha256 = _digest(img, "image")
    r.size = _size(pay, "payload")
    r.sha256 = _digest(pay, "payload")
    r.encoding = pay.get("encoding", "raw")
    if r.encoding not in ENCODINGS:
        raise OtaError("bad-encoding", "payload encoding %r is not supported" % (r.encoding,))
    enc = pay.get("encryption")
    r.enc_keyid = None
    r.aes_key = None  # filled in by decide() from the device's provisioned keys
    if enc is not None:
        _need(isinstance(enc, dict), "payload.encryption")
        if enc.get("alg") != "aes-256-cbc":
            raise OtaError("bad-encoding", "encryption %r is not supported" % (enc.get("alg"),))
        r.enc_keyid = enc.get("keyid")
        _need(isinstance(r.enc_keyid, str) and 0 < len(r.enc_keyid) <= 64, "payload.encryption.keyid")
        try:
            r.iv = unhexlify(enc.get("iv"))
        except (ValueError, TypeError):
            r.iv = b""
        _need(len(r.iv) == 16, "payload.encryption.iv")
    r.chunks = None  # plain raw payload: the payload is the image
    if r.encoding == "raw" and enc is None:
        _need(r.size == r.image_size and r.sha256 == r.image_sha256, "payload (raw must equal image)")
    else:
        _chunks(r, pay)
    url = pay.get("url")
    # Relative to the manifest, inside the release: no scheme, no absolute path, no "..".
    _need(isinstance(url, str) and url and ":" not in url and not url.startswith("/")
          and ".." not in url.split("/") and len(url) < 200, "payload.url")
    r.url = url
    return r


def decide(m, cfg, running, floor, slot_size):
    # Raises for a release this device must refuse; returns False when it is already running
    # this version (nothing to do), True when it should be installed.
    if m.chip != cfg.chip:
        raise OtaError("wrong-chip", "release is for chip %s, this is %s" % (m.chip, cfg.chip))
    if m.board != cfg.board:
        raise OtaError("wrong-board", "release is for board %s, this is %s" % (m.board, cfg.board))
    if m.counter < floor:
        raise OtaError("security-counter", "security counter %d < floor %d" % (m.counter, floor))
    cur = running_version(running)
    if m.version_t == cur:
        return False
    if m.version_t < cur:
        raise OtaError("downgrade", "release %s is older than running %s" % (m.version, running))
    if m.image_size > slot_size:
        raise OtaError("too-large", "image is %d bytes, the slot holds %d" % (m.image_size, slot_size))
    if m.enc_keyid is not None:
        m.aes_key = cfg.aes_keys.get(m.enc_keyid)
        if m.aes_key is None:
            if not cfg.aes_keys:
                raise OtaError("missing-key", "release is encrypted (key %s); this device has no AES key"
                               % m.enc_keyid)
            raise OtaError("wrong-key", "release is encrypted with key %s; this device has %s"
                           % (m.enc_keyid, ", ".join(cfg.aes_keys)))
    return True
