"""`mpota mirror sync`: an edge mirror of a release (a gateway in a plant or on a ship).

A sync fetches the upstream's manifest.json and verifies it with the release key, fetches the
payload it names (streamed to a temporary file, never more than the signed size, then size and
SHA-256 checked), fetches rollout.json if the upstream has one and verifies it with the rollout
key, refusing one older than the mirror's copy or than any it ever published (a replay), and
only then publishes into the
mirror directory, each file by a rename, in an order that never shows a device a manifest
whose payload is missing: the payload, then manifest.json, then rollout.json; the payload the
previous manifest named goes last. A sync that fails publishes nothing: the mirror keeps serving
its last good copy. Unchanged files are neither downloaded nor rewritten.

DIR/.mirror-state keeps high-water marks that outlive the published files: the largest rollout
`issued` published (per rollout key set) and the newest release version published (per release
key set). An upstream 404 for rollout.json removes the mirror's copy but not the mark, so a
replayed pre-halt document after a 404 is still refused; an older release is refused unless
allow_older.

A mirror holds no private key: it can withhold what the upstream publishes, never forge it
(docs/rollout.md, "Edge mirrors").
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import MpotaError, dsse, fetch, rolloutdoc, server
from .release import MANIFEST_MAX, MANIFEST_NAME, ReleaseError, check_manifest, compare_versions, parse_version, sha256_file
from .keys import keyid
from .rollout import ROLLOUT_NAME, release_digest

TMP_PREFIX = ".mirror-"    # temporary files: never *.json, so `mpota serve` never serves one
TMP_SUFFIX = ".part"
LOCK_NAME = ".mirror-lock"
STATE_NAME = ".mirror-state"  # high-water marks (JSON); not *.json and not an envelope: never served
FILE_MODE = 0o644         # published files are public: any web server's user reads them
BACKOFF_CAP_S = 900        # after failures, wait at most this long (or --every, if longer)


class MirrorError(MpotaError):
    """The upstream offers something the mirror refuses to serve (an attack or a bad release)."""

    def __init__(self, code: str, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.code = code


@dataclass
class SyncResult:
    version: str
    release: str                      # SHA-256 of manifest.json
    payload: str                      # the payload's path in the mirror
    downloaded: list[str] = field(default_factory=list)   # files fetched from upstream and published
    bytes: int = 0                    # payload bytes downloaded
    seconds: float = 0.0
    rollout: dict | None = None       # the rollout document now served, or None
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.downloaded or self.removed)


def _payload_path(url) -> str:
    """The payload's path relative to the manifest, if it is a plain file path inside the release."""
    if (not isinstance(url, str) or not url or "://" in url or url.startswith("/") or "\\" in url
            or "?" in url or "#" in url or "\0" in url):
        raise MirrorError("bad-manifest", f"payload url {url!r} is not a file beside manifest.json",
                          hint="a mirror copies releases whose payload lies in the release directory")
    norm = posixpath.normpath(url)
    if norm.startswith("..") or norm in (".", MANIFEST_NAME, ROLLOUT_NAME) or norm.endswith(".json"):
        raise MirrorError("bad-manifest", f"payload url {url!r} points outside the release or at a document")
    return norm


def _local_doc(path: Path, limit: int) -> bytes | None:
    try:
        if path.is_file() and path.stat().st_size <= limit:
            return path.read_bytes()
    except OSError:
        pass
    return None


def _publish_bytes(dest: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=TMP_PREFIX, suffix=TMP_SUFFIX)
    os.fchmod(fd, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_mirror_dir(dest: Path) -> None:
    """The mirror directory: created if missing; refused if it holds private keys (it is served)."""
    dest.mkdir(parents=True, exist_ok=True)
    secrets = [p for p in dest.rglob("*") if server.private_key_kind(p)]
    if secrets:
        raise MirrorError("keys-in-mirror", f"{dest} holds private keys ({', '.join(str(p.relative_to(dest)) for p in secrets[:3])}): "
                          "a mirror directory is served as it is", hint="move the keys out; a mirror needs none")
    for p in dest.glob(TMP_PREFIX + "*" + TMP_SUFFIX):  # left by a sync that was killed
        p.unlink(missing_ok=True)


def _keyset(pubs: list) -> str:
    return ",".join(sorted(keyid(k) for k in pubs))


def read_state(dest: Path) -> dict:
    """DIR/.mirror-state: {"rollout": {keyset: {"issued", "sha256"}}, "release": {keyset: {"version"}}}.
    A state file that cannot be read is refused (the marks guard against replays: never guessed)."""
    path = Path(dest) / STATE_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {"rollout": {}, "release": {}}
    except OSError as e:
        raise MirrorError("bad-state", f"cannot read {path}: {e.strerror}") from None
    try:
        st = json.loads(data)
        if not (isinstance(st, dict) and isinstance(st.get("rollout"), dict) and isinstance(st.get("release"), dict)):
            raise ValueError
        return st
    except (ValueError, RecursionError):
        raise MirrorError("bad-state", f"{path} is not the mirror's state file",
                          hint="it holds the replay high-water marks; if it was damaged, check the upstream by hand, "
                               "then remove it (the next sync starts new marks from what it publishes)") from None


def _write_state(dest: Path, st: dict) -> None:
    _publish_bytes(dest / STATE_NAME, json.dumps(st, sort_keys=True, indent=1).encode() + b"\n")


@contextlib.contextmanager
def _locked(dest: Path):
    """One sync at a time per mirror directory (an fcntl lock on DIR/.mirror-lock: it ends with
    the process that holds it; not *.json, so never served)."""
    fd = os.open(dest / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise MirrorError("busy", f"{dest} is being synced by another process (PID {pid})",
                              hint="run one `mpota mirror sync` per mirror directory (--every keeps one running)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def sync(upstream: str, dest: Path, release_keys: list, rollout_keys: list | None = None, *,
         timeout: float = 30, allow_older: bool = False) -> SyncResult:
    """One sync of the release at `upstream` (an http(s) release directory URL) into `dest`.
    MirrorError for what the mirror refuses, fetch.DownloadError for transport problems; in both
    cases `dest` is left as it was."""
    if not release_keys:
        raise MirrorError("no-key", "a mirror checks what it serves: it needs the release public key",
                          hint="give --pub keys/release.pub")
    base = upstream
    if base.rstrip("/").endswith("/" + MANIFEST_NAME):
        base = base.rstrip("/")[:-len(MANIFEST_NAME)]
    base = fetch.check_base_url(base)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        return _sync(base, dest, release_keys, rollout_keys, timeout, allow_older)


def _sync(base: str, dest: Path, release_keys: list, rollout_keys: list | None, timeout: float,
          allow_older: bool = False) -> SyncResult:
    check_mirror_dir(dest)
    state = read_state(dest)
    rel_ks = _keyset(release_keys)
    mark_version = (state["release"].get(rel_ks) or {}).get("version")
    t0 = time.monotonic()

    # 1. the manifest: signed by the release key, fields as a device checks them
    env = fetch.get(fetch.join(base, MANIFEST_NAME), MANIFEST_MAX, timeout)
    if env is None:
        raise fetch.DownloadError(f"{fetch.join(base, MANIFEST_NAME)}: not found (404)",
                                  hint="is UPSTREAM the URL of a release directory (where manifest.json is)?",
                                  code="http-404")
    try:
        m = json.loads(dsse.verify(env, release_keys, dsse.PAYLOAD_TYPE, "upstream manifest.json"))
        check_manifest(m)
    except dsse.EnvelopeError as e:
        raise MirrorError(e.code, f"upstream manifest.json refused: {e}",
                          hint="the upstream serves a release not signed by the release key: check --pub, or "
                               "the upstream has been tampered with") from None
    except (ValueError, ReleaseError) as e:
        raise MirrorError("bad-manifest", f"upstream manifest.json refused: {e}") from None
    digest = release_digest(env)
    p = m["payload"]
    rel = _payload_path(p["url"])
    res = SyncResult(version=m["version"], release=digest, payload=rel)

    # 2. the rollout document: signed by the rollout key, never older than the mirror's
    new_rollout = fetch.get(fetch.join(base, ROLLOUT_NAME), rolloutdoc.MAX_BYTES, timeout)
    cur_rollout = _local_doc(dest / ROLLOUT_NAME, rolloutdoc.MAX_BYTES)
    if new_rollout is not None:
        if not rollout_keys:
            raise MirrorError("no-rollout-key", "the upstream has a rollout.json: the mirror checks it before "
                              "serving it and needs the rollout public key",
                              hint="give --rollout-pub keys/rollout.pub")
        try:
            doc = rolloutdoc.open_document(new_rollout, rollout_keys)
        except rolloutdoc.RolloutError as e:
            raise MirrorError(e.code, f"upstream rollout.json refused: {e}",
                              hint="check --rollout-pub; otherwise the upstream has been tampered with") from None
        cur = None
        if cur_rollout is not None:
            try:
                cur = rolloutdoc.open_document(cur_rollout, rollout_keys)
            except rolloutdoc.RolloutError:
                cur = None  # not ours to trust (another key): the upstream's replaces it
        if cur is not None and cur_rollout != new_rollout and doc["issued"] <= cur["issued"]:
            raise MirrorError("rollout-replayed", f"upstream rollout.json was issued {_iso(doc['issued'])}, not after "
                              f"the mirror's copy ({_iso(cur['issued'])}): an old document replayed",
                              hint="the signer keeps issued strictly increasing; the upstream (or a cache in "
                                   "front of it) serves a stale copy. The mirror keeps its copy")
        mark = state["rollout"].get(_keyset(rollout_keys)) or {}
        if isinstance(mark.get("issued"), int) and (
                doc["issued"] < mark["issued"]
                or doc["issued"] == mark["issued"] and hashlib.sha256(new_rollout).hexdigest() != mark.get("sha256")):
            raise MirrorError("rollout-replayed", f"upstream rollout.json was issued {_iso(doc['issued'])}, before the "
                              f"newest document this mirror has published ({_iso(mark['issued'])}): an old document "
                              "replayed", hint=f"the mirror remembers it in {STATE_NAME} even when the upstream "
                              "answered 404 for rollout.json meanwhile; it keeps its copy")
        if doc["release"] != digest:
            res.notes.append(f"rollout.json names release {doc['release'][:12]}…, not this manifest "
                             f"({digest[:12]}…): devices hold back (rollout-other-release) until it is re-signed")
        res.rollout = doc

    # 3. the payload: unchanged (same SHA-256) stays; otherwise streamed, bounded by the signed size
    target = dest / rel
    staged = None
    have = target.is_file() and target.stat().st_size == p["size"] and sha256_file(target) == p["sha256"]
    if not have:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(dir=target.parent, prefix=TMP_PREFIX, suffix=TMP_SUFFIX)
        os.fchmod(fd, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as f:
                got = fetch.download(fetch.join(base, p["url"]), f, p["size"], timeout)
                f.flush()
                os.fsync(f.fileno())
            if got != p["sha256"]:
                raise MirrorError("hash-mismatch", f"upstream {p['url']}: SHA-256 {got[:16]}… differs from the signed "
                                  f"manifest's {p['sha256'][:16]}…",
                                  hint="the upstream's payload was changed after signing (or is still being "
                                       "uploaded); the mirror keeps its copy")
        except fetch.TooLarge as e:
            os.unlink(staged)
            raise MirrorError("too-large", f"upstream {p['url']} refused: {e}",
                              hint="the upstream's payload is larger than its signed manifest says") from None
        except BaseException:
            os.unlink(staged)
            raise
        res.bytes = p["size"]

    # 4. publish: payload, manifest, rollout.json, then the payload no longer named
    cur_env = _local_doc(dest / MANIFEST_NAME, MANIFEST_MAX)
    old_rel = old_version = None
    if cur_env is not None:
        try:
            old_m = json.loads(dsse.verify(cur_env, release_keys, dsse.PAYLOAD_TYPE))
            old_rel, old_version = _payload_path(old_m["payload"]["url"]), old_m["version"]
            parse_version(old_version)  # a version a device can order, or no comparison
        except (MpotaError, ValueError, KeyError, TypeError):
            old_rel = old_version = None
    newest = old_version
    if mark_version is not None:
        try:
            parse_version(mark_version)
            if newest is None or compare_versions(mark_version, newest) > 0:
                newest = mark_version
        except (ValueError, ReleaseError, TypeError):
            pass
    if newest is not None and compare_versions(m["version"], newest) < 0:
        if not allow_older:
            if staged is not None:
                os.unlink(staged)
            raise MirrorError("release-older", f"the upstream's {m['version']} is older than the {newest} this mirror "
                              "has published: possibly an old release replayed; the mirror keeps its copy",
                              hint="devices refuse a downgrade anyway, so following would only lose the good copy; "
                                   "if the upstream went back on purpose, sync once with --allow-older")
        res.notes.append(f"the upstream's {m['version']} is older than the {newest} the mirror had: devices "
                         f"on {newest} refuse it (downgrade); followed (--allow-older)")
    # the marks first: they never lag what is published (a sync killed after this publishes the same again)
    new_state = {"rollout": dict(state["rollout"]), "release": dict(state["release"])}
    new_state["release"][rel_ks] = {"version": m["version"]}  # newer, the same, or older by --allow-older
    if res.rollout is not None:
        new_state["rollout"][_keyset(rollout_keys)] = {"issued": res.rollout["issued"],
                                                       "sha256": hashlib.sha256(new_rollout).hexdigest()}
    if new_state != state:
        _write_state(dest, new_state)
    if staged is not None:
        os.replace(staged, target)
        res.downloaded.append(rel)
    if cur_env != env:
        _publish_bytes(dest / MANIFEST_NAME, env)
        res.downloaded.append(MANIFEST_NAME)
    if new_rollout is not None and cur_rollout != new_rollout:
        _publish_bytes(dest / ROLLOUT_NAME, new_rollout)
        res.downloaded.append(ROLLOUT_NAME)
    elif new_rollout is None and cur_rollout is not None:
        (dest / ROLLOUT_NAME).unlink()
        res.removed.append(ROLLOUT_NAME)
        res.notes.append("the upstream has no rollout.json: the mirror's copy is removed (devices with a rollout "
                         "role hold back: rollout-missing)")
    if old_rel and old_rel != rel and (dest / old_rel).is_file():
        (dest / old_rel).unlink()
        res.removed.append(old_rel)
    _fsync_dir(dest)
    res.seconds = time.monotonic() - t0
    return res


def _iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def describe(res: SyncResult) -> str:
    """One line for a sync."""
    if not res.changed:
        what = "up to date"
    else:
        what = "published " + ", ".join(res.downloaded) if res.downloaded else ""
        if res.bytes:
            rate = f", {res.bytes / res.seconds / 1024:.0f} KiB/s" if res.seconds >= 0.05 else ""
            what += f" (payload {res.bytes / 1024:.1f} KiB in {res.seconds:.1f} s{rate})"
        if res.removed:
            what += ("; " if what else "") + "removed " + ", ".join(res.removed)
    ro = res.rollout
    tail = (f"; rollout {ro['rollout']} issued {_iso(ro['issued'])}"
            + (", HALTED" if ro.get("halted") is not None else "") if ro else "; no rollout.json")
    return f"{res.version} ({res.release[:12]}…): {what}{tail}"


def next_delay(every: float, failures: int) -> float:
    """Seconds to wait before the next sync: `every`; after failures, doubling up to
    max(every, BACKOFF_CAP_S), with ±10 % jitter so that many mirrors do not retry together."""
    if failures <= 0:
        return every
    d = min(every * (2 ** min(failures, 20)), max(every, BACKOFF_CAP_S))
    return d * random.uniform(0.9, 1.1)


def run(upstream: str, dest: Path, release_keys: list, rollout_keys: list | None = None, *, every: float,
        timeout: float = 30, allow_older: bool = False, iterations: int | None = None, sleep=time.sleep, say=print) -> int:
    """Sync every `every` seconds (forever, or `iterations` times), one line per sync; failures
    (any exception from one sync: what an upstream sends never ends the loop) keep the last good
    copy, are printed and back off. Returns the number of failed syncs."""
    failures = total_failed = 0
    n = 0
    while iterations is None or n < iterations:
        n += 1
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            res = sync(upstream, dest, release_keys, rollout_keys, timeout=timeout, allow_older=allow_older)
            failures = 0
            say(f"mirror: {stamp} {describe(res)}")
            for note in res.notes:
                say(f"mirror:   note: {note}")
        except Exception as e:  # one sync's failure, whatever the upstream sent, never ends --every
            failures += 1
            total_failed += 1
            kind = ("upstream unreachable" if isinstance(e, fetch.DownloadError) else "refused"
                    if isinstance(e, MpotaError) else "cannot write the mirror" if isinstance(e, OSError)
                    else f"sync failed ({type(e).__name__})")
            last = (Path(dest) / MANIFEST_NAME).is_file()
            delay = next_delay(every, failures)
            say(f"mirror: {stamp} {kind}: {e}; "
                + ("serving the last good copy" if last else "nothing to serve yet")
                + (f"; next try in {delay:.0f} s" if iterations is None or n < iterations else ""))
        else:
            delay = next_delay(every, 0)
        if iterations is not None and n >= iterations:
            break
        sleep(delay)
    return total_failed
