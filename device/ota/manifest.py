# The signed manifest body: parse and check it against this device. Bytes in, no I/O.
from ota import jsonfile
from binascii import unhexlify
from ota.errors import OtaError
from micropython import const

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
    # [payload size, first 16 bytes of its SHA-256 in hex]. Sizes must add up exactly. Kept
    # packed through the payload stage: r.chunks (how many), r.chunk_sizes (array of them),
    # r.chunk_digests (16 bytes each, one after the other): 20 bytes a chunk, not a tuple, an
    # int and a bytes object (about 90 on x64).
    r.chunk = pay.get("chunk")
    _need(isinstance(r.chunk, int) and r.chunk % 4096 == 0 and 4096 <= r.chunk <= 0x100000, "payload.chunk")
    r.wbits = pay.get("wbits", 10)
    _need(isinstance(r.wbits, int) and 9 <= r.wbits <= 15, "payload.wbits")
    chunks = pay.get("chunks")
    _need(isinstance(chunks, list) and 0 < len(chunks) <= _CHUNKS_MAX, "payload.chunks")
    _need(len(chunks) == (r.image_size + r.chunk - 1) // r.chunk, "payload.chunks (count)")
    total = 0
    from array import array
    sizes = array("I")
    digests = bytearray(16 * len(chunks))
    for i, c in enumerate(chunks):
        _need(isinstance(c, list) and len(c) == 2 and isinstance(c[0], int) and 0 < c[0] < 0x40000000
              and isinstance(c[1], str) and len(c[1]) == 32, "payload.chunks entry")
        if r.enc_keyid is not None:
            _need(c[0] % 16 == 0, "payload.chunks entry (AES block size)")
        try:
            digests[16 * i:16 * i + 16] = unhexlify(c[1])
        except ValueError:
            _need(False, "payload.chunks digest")
        sizes.append(c[0])
        total += c[0]
    _need(total == r.size, "payload.chunks (sizes add up to payload.size)")
    r.chunks = len(chunks)
    r.chunk_sizes = sizes
    r.chunk_digests = digests


# Versions (docs/versions.md): [v]N[.N[.N[.N]]][-PRERELEASE][+BUILD], ordered as semver 2.0.0
# orders them (section 11); a `git describe` suffix ("-3-gabc1234", "-dirty") counts as build
# metadata. The same rule as mpota's host side (host_tools/release.py), checked against it by
# tests/test_versions.py. Bounded: at most 64 characters and 8 pre-release identifiers, and every
# number at most 2**30 - 1, checked as text before int(): a small int on the ESP32, never a big one.
_VERSION_MAX = const(64)
_IDS_MAX = const(8)
_NUM_MAX = "1073741823"


def _digits(p):
    if not p:
        return False
    for c in p:
        if not "0" <= c <= "9":  # ASCII only (CPython's str.isdigit() also takes other scripts')
            return False
    return True


def _num(p):
    # p's value if it is 1-10 digits worth at most 2**30 - 1, else -1
    if len(p) > 10 or (len(p) == 10 and p > _NUM_MAX) or not _digits(p):
        return -1
    return int(p)


def _ident(p):
    # a pre-release or build identifier: [0-9A-Za-z-]+
    if not p:
        return False
    for c in p:
        if not ("0" <= c <= "9" or "a" <= c <= "z" or "A" <= c <= "Z" or c == "-"):
            return False
    return True


def _describe_base(t):
    # t (without "+BUILD") less a `git describe` suffix: "-dirty", then "-N-gHASH" (N digits,
    # HASH 4+ lowercase hex) after something. The rest is the tag the build was made from.
    if t.endswith("-dirty"):
        t = t[:-6]
    i = t.rfind("-")
    if i > 0 and len(t) - i > 5 and t[i + 1] == "g":
        for c in t[i + 2:]:
            if not ("0" <= c <= "9" or "a" <= c <= "f"):
                return t
        j = t.rfind("-", 0, i)
        if j > 0 and _digits(t[j + 1:i]):
            return t[:j]
    return t


def parse_version(text):
    # -> the version's sort key, or None if `text` is not a version. The key is a flat tuple:
    # the four numbers ("2.0" is 2.0.0.0), then 1 for a release, or 0 and per pre-release
    # identifier (0, number) or (1, "word"). Tuples then compare as semver orders versions: a
    # pre-release below its release, numbers below words, numbers by value, words in ASCII order,
    # a shorter list of equal identifiers first; two elements at one place are of one type.
    if not isinstance(text, str) or not 0 < len(text) <= _VERSION_MAX:
        return None
    t = text[1:] if text[0] in "vV" else text
    i = t.find("+")
    if i >= 0:
        for p in t[i + 1:].split("."):  # build metadata: checked, then ignored
            if not _ident(p):
                return None
        t = t[:i]
    t = _describe_base(t)
    i = t.find("-")
    pre = None
    if i >= 0:
        pre = t[i + 1:].split(".")
        t = t[:i]
    parts = t.split(".")
    if len(parts) > 4:
        return None
    key = []
    for p in parts:
        n = _num(p)
        if n < 0:
            return None
        key.append(n)
    while len(key) < 4:
        key.append(0)
    if pre is None:
        key.append(1)
        return tuple(key)
    if len(pre) > _IDS_MAX:
        return None
    key.append(0)
    for p in pre:
        if not _ident(p):
            return None
        if _digits(p):
            n = _num(p)
            if n < 0 or (p[0] == "0" and len(p) > 1):  # semver: no leading zeros in numbers
                return None
            key.append(0)
            key.append(n)
        else:
            key.append(1)
            key.append(p)
    return tuple(key)


def running_version(text):
    # The running firmware's key. An empty version (stock MicroPython builds leave
    # esp_app_desc_t's empty) or one that is not a version sorts below every release: the
    # device can always be moved onto a versioned firmware.
    return parse_version(text) or ()


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
    _need(isinstance(r.version, str), "version")
    r.version_t = parse_version(r.version)
    if r.version_t is None:
        raise OtaError("bad-version", "version %r is not a version (docs/versions.md)" % r.version[:_VERSION_MAX])
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
