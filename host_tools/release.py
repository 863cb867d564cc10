"""Build and verify releases: a directory with manifest.json (a DSSE envelope) and the payload.

The manifest body (JSON) fields, all checked by the device agent:
  schema            1
  version           firmware version, strictly newer than the running one to be installed
  board, chip       which devices may install it
  security_counter  anti-rollback floor: devices refuse releases below what they confirmed
  image             {"size", "sha256"} of the image as it ends up in the flash slot
  payload           {"url" (relative to the manifest), "size", "sha256", "encoding": "raw" |
                    "deflate", and for chunked payloads "chunk", "chunks", "wbits",
                    "encryption": {"alg": "aes-256-cbc", "keyid", "iv"}} (see payload.py)
  critical          names of fields the device must understand, or refuse the release
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import MpotaError, dsse, espimage, payload as payloads, read_input

SCHEMA = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_MAX = 4096      # the device refuses larger manifests without reading them
ENCODINGS = ("raw", "deflate")
KNOWN_FIELDS = {"schema", "version", "board", "chip", "security_counter", "image", "payload",
                "critical", "created_by"}


class ReleaseError(MpotaError):
    def __init__(self, code, message, hint=None):
        super().__init__(message, hint)
        self.code = code


# Versions: docs/versions.md. The device applies the same rule (device/ota/manifest.py,
# parse_version); tests/test_versions.py checks that the two agree.
VERSION_MAX = 64          # characters, "v" and "+BUILD" included
PRERELEASE_IDS_MAX = 8    # dot-separated pre-release identifiers
NUMBER_MAX = 2**30 - 1    # every number is a small int on the ESP32 (31-bit)
VERSION_FORM = "[v]MAJOR[.MINOR[.PATCH[.N]]][-PRERELEASE][+BUILD]"
_DIGITS = frozenset("0123456789")
_IDENT = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-")
_HEX = frozenset("0123456789abcdef")


def _bad_version(text, why):
    return ReleaseError("bad-version", f"version {text!r} is not a version: {why}",
                        hint=f"versions are {VERSION_FORM}, e.g. 1.2.3, v2.0.0-rc.1 (docs/versions.md)")


def _is_digits(p: str) -> bool:
    return bool(p) and set(p) <= _DIGITS   # ASCII only: str.isdigit() also takes other scripts' digits


def _number(text: str, p: str, what: str) -> int:
    # checked as text first, as the device does: a 40-digit string never becomes an int
    if not _is_digits(p) or len(p) > 10 or int(p) > NUMBER_MAX:
        raise _bad_version(text, f"{what} {p!r} is not a number from 0 to {NUMBER_MAX}")
    return int(p)


def _split_describe(t: str) -> tuple[str, str]:
    """`t` (without "+BUILD") -> (the tag, the `git describe` suffix or ""): "-dirty", then
    "-N-gHASH" (N digits, HASH 4+ lowercase hex) after a non-empty tag."""
    base = t[:-6] if t.endswith("-dirty") else t
    head, sep, h = base.rpartition("-")
    if head and len(h) >= 5 and h[0] == "g" and set(h[1:]) <= _HEX:
        tag, sep2, n = head.rpartition("-")
        if tag and sep2 and _is_digits(n):
            base = tag
    return base, t[len(base):]


def parse_version(text: str) -> tuple:
    """The version's sort key: the four numbers ("2.0" is 2.0.0.0), then 1 for a release, or 0
    and per pre-release identifier (0, number) or (1, "word"), so that tuples compare as
    semver 2.0.0 orders versions. Build metadata and a `git describe` suffix are checked and left
    out. ReleaseError "bad-version" for anything else."""
    if not isinstance(text, str) or not 0 < len(text) <= VERSION_MAX:
        raise _bad_version(text, "not a string" if not isinstance(text, str) else "empty" if not text
                           else f"longer than {VERSION_MAX} characters")
    t = text[1:] if text[0] in "vV" else text
    t, plus, build = t.partition("+")
    if plus:
        for p in build.split("."):
            if not p or not set(p) <= _IDENT:
                raise _bad_version(text, f"build identifier {p!r} is not [0-9A-Za-z-]+")
    t = _split_describe(t)[0]
    t, dash, pre = t.partition("-")
    parts = t.split(".")
    if len(parts) > 4:
        raise _bad_version(text, "more than 4 numbers")
    key = [_number(text, p, "part") for p in parts] + [0] * (4 - len(parts))
    if not dash:
        return tuple(key) + (1,)
    ids = pre.split(".")
    if len(ids) > PRERELEASE_IDS_MAX:
        raise _bad_version(text, f"more than {PRERELEASE_IDS_MAX} pre-release identifiers")
    key.append(0)
    for p in ids:
        if not p or not set(p) <= _IDENT:
            raise _bad_version(text, f"pre-release identifier {p!r} is not [0-9A-Za-z-]+")
        if _is_digits(p):
            if len(p) > 1 and p[0] == "0":
                raise _bad_version(text, f"pre-release number {p!r} has a leading zero")
            key += [0, _number(text, p, "pre-release number")]
        else:
            key += [1, p]
    return tuple(key)


def describe_suffix(version: str) -> str:
    """The `git describe` suffix of a valid version ("-3-gabc1234", "-dirty", both), or "": a
    build after a tag or from a changed tree, which devices order as the tag itself."""
    parse_version(version)
    return _split_describe(version.partition("+")[0])[1]


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version `a` is older than, the same as or newer than `b`, as a device
    orders them."""
    ka, kb = parse_version(a), parse_version(b)
    return (ka > kb) - (ka < kb)


def is_newer(new: str, old: str) -> bool:
    """Is version `new` newer than `old`, as a device decides it? The one place the host orders
    versions (`mpota release` against what a release directory holds)."""
    return compare_versions(new, old) > 0


def published_version(out_dir: Path) -> str | None:
    """The version in OUT/manifest.json as it is (signature not checked: only to compare), or
    None when there is no readable manifest there."""
    import base64
    try:
        env = json.loads((Path(out_dir) / MANIFEST_NAME).read_bytes())
        version = json.loads(base64.b64decode(env["payload"]))["version"]
        parse_version(version)
        return version
    except (OSError, ValueError, KeyError, TypeError, ReleaseError):
        return None


def slot_limit(board: str) -> tuple[int, list[str]]:
    """The smallest OTA slot of the board definitions whose board id is `board` (what the
    devices' ota_config.json carries), and those definitions' names; (0, []) if none."""
    from . import BOARDS_DIR, partitions
    sizes, names = [], []
    for bj in sorted(BOARDS_DIR.glob("*/board.json")):
        info = json.loads(bj.read_text())
        if info.get("board_id", info.get("name")) != board:
            continue
        names.append(bj.parent.name)
        sizes += [q.size for q in partitions.parse_csv(bj.parent / "partitions.csv") if q.is_ota_slot]
    return (min(sizes) if sizes else 0), names


def preflight(image_path: Path, out_dir: Path, *, version=None, chip=None, board=None) -> None:
    """Refuse, before signing, a release its devices would refuse or ignore: a board id no board
    definition has, a board of another chip than the image, an image larger than the board's OTA
    slot, a version not newer than the one OUT already holds, a `git describe` version (a build
    after a tag or from a changed tree). Each refusal says how `--force` overrides it (for the
    rare deliberate case: a board of your own, a re-signed release, a test build)."""
    from . import BOARDS_DIR
    data = read_input(image_path, "firmware image")
    info = espimage.parse(data)
    chip = chip or info.chip
    version = version or info.version
    board = board or chip
    force = "; --force signs it anyway"
    suffix = describe_suffix(version) if version else ""  # no version at all: build() says why
    if suffix:
        tag = version[:len(version.partition("+")[0]) - len(suffix)]
        commits = suffix.removesuffix("-dirty")
        what = ", ".join(x for x in (f"{commits.split('-')[1]} commit(s) after {tag}" if commits else f"tag {tag}",
                                     "uncommitted changes" if suffix.endswith("-dirty") else "") if x)
        raise ReleaseError("dev-build", f"version {version} is a `git describe` version ({what}): devices order it "
                           f"as {tag}, so those running {tag} or another build of it would see nothing to do",
                           hint="tag the commit (e.g. git tag v1.2.4), build from a clean tree and release that"
                                + force)
    limit, defs = slot_limit(board)
    if not defs:
        ids = sorted({json.loads(p.read_text()).get("board_id", p.parent.name)
                      for p in BOARDS_DIR.glob("*/board.json")})
        raise ReleaseError("wrong-board", f"no board definition has board id {board!r}: no device "
                           "provisioned by mpota would install this release",
                           hint=f"--board is one of {', '.join(ids)}" + force)
    defs_info = [json.loads((BOARDS_DIR / d / "board.json").read_text()) for d in defs]
    if all(d["chip"] != info.chip for d in defs_info):
        raise ReleaseError("wrong-chip", f"board {board} is an {defs_info[0]['chip']}; the image is for "
                           f"{info.chip or 'an unknown chip'}: its devices would refuse it (wrong-chip)",
                           hint=f"build the firmware for {defs_info[0]['chip']}, or give --board {info.chip}" + force)
    if len(data) > limit:
        raise ReleaseError("too-large", f"the image is {len(data)} bytes; board {board}'s OTA slots hold {limit} "
                           f"(boards/{defs[0]}/partitions.csv): its devices would refuse it (too-large)",
                           hint="build a smaller firmware (fewer frozen modules), or use a board definition "
                                "with larger slots" + force)
    old = published_version(out_dir)
    if old is not None and version and not is_newer(version, old):
        same = not is_newer(old, version)
        raise ReleaseError("downgrade" if not same else "not-newer",
                           f"{Path(out_dir) / MANIFEST_NAME} already holds {old}; {version} is "
                           + ("the same version" + (" to devices (docs/versions.md)" if version != old else "")
                              + ": devices on it would see nothing to do" if same else
                              "older: devices would refuse it as a downgrade"),
                           hint="release a newer version, or write to another --out" + force)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Release:
    manifest: dict
    body: bytes
    path: Path


def build(image_path: Path, out_dir: Path, keys: list[Ed25519PrivateKey], *, version=None,
          chip=None, board=None, security_counter=None, compress=False, aes_key=None,
          chunk=payloads.DEFAULT_CHUNK, wbits=payloads.DEFAULT_WBITS) -> Release:
    """Sign `image_path` into `out_dir`: version, chip and security counter come from the image
    (esp_app_desc_t and header) unless given. `compress` and `aes_key` make a chunked payload."""
    image_path = Path(image_path)
    data = read_input(image_path, "firmware image")
    info = espimage.parse(data)
    if chip and info.chip and chip != info.chip:
        raise ReleaseError("wrong-chip", f"--chip {chip} but the image header says {info.chip}",
                           hint="build the firmware for the chip you name, or drop --chip")
    chip = chip or info.chip
    if not chip:
        raise ReleaseError("wrong-chip", f"image chip id {info.chip_id} is not a known chip", hint="pass --chip")
    version = version or info.version
    if not version:
        raise ReleaseError("bad-version", "the image carries no version (esp_app_desc_t.version is empty, as stock "
                           "MicroPython builds leave it): devices could not tell it from the firmware they run",
                           hint="build with CONFIG_APP_EXCLUDE_PROJECT_VER_VAR=n and PROJECT_VER set "
                                "(docs/hardware.md, 'Versions in images')")
    parse_version(version)
    if version != info.version:
        raise ReleaseError("version-mismatch", f"--version {version} but the image says {info.version!r}",
                           hint="the device checks the version inside the image; rebuild it with that version")
    if security_counter is None:
        security_counter = info.secure_version
    if security_counter < 0 or security_counter > 0x3FFFFFFF:
        raise ReleaseError("bad-counter", "security counter must be 0..1073741823")
    digest = hashlib.sha256(data).hexdigest()
    if compress or aes_key:
        blob, fields = payloads.encode(data, compress=compress, aes_key=aes_key, chunk=chunk, wbits=wbits)
        name = image_path.name + (".z" if compress else "") + (".enc" if aes_key else "")
    else:
        blob, fields, name = None, {"size": len(data), "sha256": digest, "encoding": "raw"}, image_path.name
    manifest = {
        "schema": SCHEMA,
        "version": version,
        "board": board or chip,
        "chip": chip,
        "security_counter": security_counter,
        "image": {"size": len(data), "sha256": digest},
        "payload": {"url": name, **fields},
        "critical": [],
        # when it was signed: every build of a release has a manifest of its own (a device that
        # rejected one build tries a new one afresh: README, "Availability")
        "issued": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    envelope = dsse.sign(body, keys)
    if len(envelope) > MANIFEST_MAX:
        raise ReleaseError("manifest-too-large", f"manifest is {len(envelope)} bytes; devices accept {MANIFEST_MAX}",
                           hint="a larger --chunk lists fewer chunks")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if blob is not None:
        (out_dir / name).write_bytes(blob)
    elif (out_dir / name).resolve() != image_path.resolve():
        shutil.copyfile(image_path, out_dir / name)
    tmp = out_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_bytes(envelope)
    tmp.replace(out_dir / MANIFEST_NAME)
    return Release(manifest, body, out_dir)


def check_manifest(m) -> None:
    """The field checks the device makes, for host-side verification."""
    def need(cond, what):
        if not cond:
            raise ReleaseError("bad-manifest", f"manifest field {what} is missing or malformed")
    need(isinstance(m, dict), "(body)")
    need(m.get("schema") == SCHEMA, "schema")
    need(isinstance(m.get("version"), str), "version")
    parse_version(m["version"])
    for k in ("board", "chip"):
        need(isinstance(m.get(k), str), k)
    need(isinstance(m.get("security_counter"), int), "security_counter")
    for part in ("image", "payload"):
        p = m.get(part)
        need(isinstance(p, dict), part)
        need(isinstance(p.get("size"), int) and p["size"] > 0, part + ".size")
        need(isinstance(p.get("sha256"), str) and len(p["sha256"]) == 64, part + ".sha256")
    need(isinstance(m["payload"].get("url"), str), "payload.url")
    if m["payload"].get("encoding", "raw") not in ENCODINGS:
        raise ReleaseError("bad-encoding", f"payload encoding {m['payload'].get('encoding')!r} is not supported")
    crit = m.get("critical", [])
    need(isinstance(crit, list), "critical")
    unknown = [c for c in crit if c not in KNOWN_FIELDS]
    if unknown:
        raise ReleaseError("unsupported-critical", f"critical fields not understood: {', '.join(map(str, unknown))}")


def verify(release_dir: Path, trusted: list[Ed25519PublicKey], aes_key: bytes | None = None) -> Release:
    """Check signature, manifest fields, payload size and hash and the image itself (for an
    encrypted payload the image inside is checked only with `aes_key`)."""
    release_dir = Path(release_dir)
    mpath = release_dir / MANIFEST_NAME if release_dir.is_dir() else release_dir
    release_dir = mpath.parent
    envelope = read_input(mpath, hint="pass a release directory made by `mpota release`")
    if len(envelope) > MANIFEST_MAX:
        raise ReleaseError("manifest-too-large", f"manifest is {len(envelope)} bytes; devices accept {MANIFEST_MAX}")
    body = dsse.verify(envelope, trusted)
    try:
        m = json.loads(body)
    except ValueError:
        raise ReleaseError("bad-manifest", "signed payload is not JSON") from None
    check_manifest(m)
    p = m["payload"]
    ppath = (release_dir / p["url"]).resolve()
    if release_dir.resolve() not in ppath.parents:
        raise ReleaseError("bad-manifest", f"payload url {p['url']!r} points outside the release")
    if not ppath.is_file():
        raise ReleaseError("missing-payload", f"payload {p['url']} is not in {release_dir}")
    size = ppath.stat().st_size
    if size != p["size"]:
        code = "truncated" if size < p["size"] else "too-long"
        raise ReleaseError(code, f"payload is {size} bytes, manifest says {p['size']}")
    if sha256_file(ppath) != p["sha256"]:
        raise ReleaseError("hash-mismatch", "payload SHA-256 differs from the manifest")
    image = None
    if "chunks" in p:
        if p.get("encryption") is None or aes_key is not None:
            try:
                image = payloads.decode(ppath.read_bytes(), p, m["image"]["size"], aes_key)
            except MpotaError as e:
                raise ReleaseError("bad-payload", str(e), e.hint) from None
            if hashlib.sha256(image).hexdigest() != m["image"]["sha256"]:
                raise ReleaseError("hash-mismatch", "the decoded image's SHA-256 differs from the manifest")
    elif p.get("encoding", "raw") == "raw":
        image = ppath.read_bytes()
    if image is not None:
        info = espimage.parse(image)
        if info.version != m["version"]:
            raise ReleaseError("version-mismatch", f"image says version {info.version}, manifest {m['version']}")
        if info.chip != m["chip"]:
            raise ReleaseError("wrong-chip", f"image is for {info.chip}, manifest says {m['chip']}")
    return Release(m, body, release_dir)
