"""`mpota inspect FILE`: what a firmware image, a merged flash image, a manifest or a release
directory says about itself, as `esptool image-info` and imgtool's `dumpinfo` do. It reports
and does not judge: problems are listed and the exit status is 0 whenever the file could be
read (`mpota verify` is the gate). With trusted keys (--pub) each signature is checked and a
release is verified as `mpota verify` does.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature

from . import MpotaError, dsse, espimage, keys, read_input
from .release import MANIFEST_NAME


def inspect(path: Path, trusted=(), aes_key: bytes | None = None) -> dict:
    """The report for `path`: {"kind": "app" | "merged" | "manifest" | "release", ...}."""
    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file():
            raise MpotaError(f"{path} has no {MANIFEST_NAME}: not a release directory",
                             hint="give a release directory, a manifest.json or a firmware .bin")
        return manifest_report(path / MANIFEST_NAME, trusted, aes_key, release_dir=True)
    data = read_input(path, "file", hint="give a firmware .bin, a manifest.json or a release directory")
    if data.lstrip()[:1] == b"{":
        return manifest_report(path, trusted, aes_key, release_dir=False)
    return image_report(data)


# ---- firmware ----------------------------------------------------------------------------------
def image_report(data: bytes) -> dict:
    """An app image (espimage.describe), or a merged image: bootloader, partition table, app."""
    from . import flashing
    if espimage.is_esp8266(data) or flashing.is_app_image(data):
        return espimage.describe(data)
    for info in _real_boards():
        try:
            kind, bl, app, table = flashing.split_firmware(data, info)
        except MpotaError:
            continue
        if kind != "merged":
            continue
        rep = {"kind": "merged", "file_size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
               "bootloader": None if bl is None else {
                   "offset": int(info["bootloader_offset"], 0), "size": len(bl),
                   "chip": espimage.CHIP_BY_ID.get(int.from_bytes(bl[12:14], "little")),
                   "sha256": hashlib.sha256(bl).hexdigest()},
               "partitions": [{"label": p.label, "type": p.type, "subtype": p.subtype, "offset": p.offset,
                               "size": p.size} for p in table or []],
               "app": espimage.describe(app)}
        rep["valid"] = rep["app"]["valid"]
        rep["problems"] = ["app: " + p for p in rep["app"]["problems"]]
        return rep
    return espimage.describe(data)  # raises with the reason, or reports the image's problems


def _real_boards() -> list[dict]:
    from . import BOARDS_DIR
    infos = [json.loads(p.read_text()) for p in sorted(BOARDS_DIR.glob("*/board.json"))]
    return [i for i in infos if not i.get("emulates")]


# ---- manifests and releases --------------------------------------------------------------------
def manifest_report(mpath: Path, trusted=(), aes_key: bytes | None = None, release_dir: bool = False) -> dict:
    from . import release
    envelope = read_input(mpath, "manifest")
    try:
        env = json.loads(envelope)
        body = base64.b64decode(env["payload"], validate=True)
        sigs = env["signatures"]
        ptype = env["payloadType"]
        if not isinstance(sigs, list) or not isinstance(ptype, str):
            raise TypeError
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise MpotaError(f"{mpath} is not a DSSE envelope (payloadType, payload, signatures)",
                         hint="give a manifest.json made by `mpota release`, a release directory or a firmware .bin") from None
    problems = []
    if len(envelope) > release.MANIFEST_MAX:
        problems.append(f"manifest is {len(envelope)} bytes; devices accept {release.MANIFEST_MAX}")
    try:
        m = json.loads(body)
    except ValueError:
        m = None
        problems.append("the signed payload is not JSON")
    by_id = {keys.keyid(k): k for k in trusted}
    msg = dsse.pae(ptype, body)
    signatures = []
    for s in sigs:
        kid = s.get("keyid") if isinstance(s, dict) else None
        entry = {"keyid": kid, "trusted": (kid in by_id) if trusted else None, "valid": None}
        if trusted and kid in by_id:
            try:
                by_id[kid].verify(base64.b64decode(s.get("sig", ""), validate=True), msg)
                entry["valid"] = True
            except (InvalidSignature, ValueError, binascii.Error):
                entry["valid"] = False
        signatures.append(entry)
    rep = {"kind": "release" if release_dir else "manifest", "path": str(mpath), "payload_type": ptype,
           "manifest_size": len(envelope), "signatures": signatures}
    if isinstance(m, dict):
        img, pl = m.get("image") or {}, m.get("payload") or {}
        enc = pl.get("encryption") if isinstance(pl, dict) else None
        rep.update({
            "schema": m.get("schema"), "version": m.get("version"), "board": m.get("board"), "chip": m.get("chip"),
            "security_counter": m.get("security_counter"), "critical": m.get("critical"),
            "image": {"size": img.get("size"), "sha256": img.get("sha256")} if isinstance(img, dict) else img,
            "payload": {"url": pl.get("url"), "size": pl.get("size"), "sha256": pl.get("sha256"),
                        "encoding": pl.get("encoding", "raw"), "chunk": pl.get("chunk"),
                        "chunks": len(pl["chunks"]) if isinstance(pl.get("chunks"), list) else None,
                        "wbits": pl.get("wbits"),
                        "encryption": {"alg": enc.get("alg"), "keyid": enc.get("keyid")} if isinstance(enc, dict) else None}
            if isinstance(pl, dict) else pl,
        })
        if release_dir and isinstance(pl, dict) and isinstance(pl.get("url"), str):
            f = (mpath.parent / pl["url"]).resolve()
            present = f.is_file() and mpath.parent.resolve() in f.parents
            rep["payload_file"] = {"present": present, "size": f.stat().st_size if present else None,
                                   "sha256_valid": (release.sha256_file(f) == pl.get("sha256")) if present else None}
            if not present:
                problems.append(f"payload {pl['url']} is not in the release directory")
            elif not rep["payload_file"]["sha256_valid"] or rep["payload_file"]["size"] != pl.get("size"):
                problems.append("the payload file's size or SHA-256 differs from the manifest")
    rep["verified"] = None
    if trusted:
        if not any(s["valid"] for s in signatures):
            problems.append("no signature by a trusted key verifies" if any(s["trusted"] for s in signatures)
                            else "no signature by a trusted key")
        try:
            release.verify(mpath if not release_dir else mpath.parent, list(trusted), aes_key)
            rep["verified"] = True
        except MpotaError as e:
            rep["verified"] = False
            code = getattr(e, "code", None)
            problems.append(f"verify: {code + ': ' if code else ''}{e}")
    rep["problems"] = list(dict.fromkeys(problems))
    rep["valid"] = not rep["problems"]
    return rep


# ---- for people ----------------------------------------------------------------------------------
def _size(n) -> str:
    return f"{n} bytes" if isinstance(n, int) else str(n)


def describe(rep: dict) -> list[str]:
    """The report as text lines (the --json form is the report itself)."""
    kind = rep["kind"]
    if kind == "app":
        return _app_lines(rep)
    if kind == "merged":
        out = [f"merged flash image, {_size(rep['file_size'])}, sha256 {rep['sha256']}"]
        bl = rep["bootloader"]
        if bl:
            out.append(f"  bootloader at 0x{bl['offset']:x}: {_size(bl['size'])}, chip {bl['chip']}, sha256 {bl['sha256']}")
        for p in rep["partitions"]:
            out.append(f"  partition {p['label']:10} type {p['type']} subtype 0x{p['subtype']:02x} "
                       f"at 0x{p['offset']:06x}, {_size(p['size'])}")
        out += ["  app:"] + ["    " + line for line in _app_lines(rep["app"])]
        return out
    out = [f"{'release directory' if kind == 'release' else 'manifest'} {rep['path']} ({_size(rep['manifest_size'])}, "
           f"{rep['payload_type']})"]
    for k in ("version", "board", "chip", "security_counter", "schema", "critical"):
        if k in rep:
            out.append(f"  {k + ':':18} {rep[k]}")
    if isinstance(rep.get("image"), dict):
        out.append(f"  {'image:':18} {_size(rep['image']['size'])}, sha256 {rep['image']['sha256']}")
    pl = rep.get("payload")
    if isinstance(pl, dict):
        how = pl["encoding"] + (f", wbits {pl['wbits']}" if pl.get("wbits") else "") + (
            f", {pl['chunks']} chunks of {pl['chunk']} bytes" if pl.get("chunks") else "") + (
            f", {pl['encryption']['alg']} key {pl['encryption']['keyid']}" if pl.get("encryption") else "")
        out.append(f"  {'payload:':18} {pl['url']}: {_size(pl['size'])} ({how}), sha256 {pl['sha256']}")
    pf = rep.get("payload_file")
    if pf:
        out.append(f"  {'payload file:':18} " + ("missing" if not pf["present"] else
                   f"{_size(pf['size'])}, sha256 {'valid' if pf['sha256_valid'] else 'INVALID'}"))
    for s in rep["signatures"]:
        state = ("not checked (give --pub)" if s["trusted"] is None else "not a trusted key" if not s["trusted"]
                 else "valid" if s["valid"] else "INVALID")
        out.append(f"  {'signature:':18} key id {s['keyid']}: {state}")
    if rep["verified"] is not None:
        out.append(f"  {'verified:':18} {'yes' if rep['verified'] else 'no'}")
    out += [f"  problem: {p}" for p in rep["problems"]]
    return out


def _app_lines(r: dict) -> list[str]:
    app = r.get("app") or {}
    out = [f"ESP app image for {r['chip'] or 'chip id %d' % r['chip_id']} (chip id {r['chip_id']}), "
           f"{_size(r['image_size'])} of {_size(r['file_size'])}, sha256 {r['sha256']}"]
    if app:
        out += [f"  {'version:':18} {app['version'] or '(empty)'}",
                f"  {'secure_version:':18} {app['secure_version']}",
                f"  {'project:':18} {app['project']}",
                f"  {'ESP-IDF:':18} {app['idf_version']} ({app['date']} {app['time']})"]
        if "simulated_behavior" in app:
            out.append(f"  {'simulated:':18} {app['simulated_behavior']}")
    out += [f"  {'chip revision:':18} min {r['min_chip_rev']}, max {r['max_chip_rev']}",
            f"  {'entry point:':18} 0x{r['entry_point']:08x}",
            f"  {'segments:':18} {len(r['segments'])}"]
    out += [f"    {s['index']}: load 0x{s['load_address']:08x}, {_size(s['length'])} at file offset 0x{s['file_offset']:x}"
            for s in r["segments"]]
    out.append(f"  {'checksum:':18} 0x{r['checksum']['computed']:02x} ({'valid' if r['checksum']['valid'] else 'INVALID'})")
    if r["hash_appended"]:
        out.append(f"  {'SHA-256 appended:':18} {r['hash_appended']['stored']} "
                   f"({'valid' if r['hash_valid'] else 'INVALID'})")
    out += [f"  problem: {p}" for p in r["problems"]]
    return out
