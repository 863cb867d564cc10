"""Payload encodings: raw, chunked raw-deflate, and AES-256-CBC encryption of either.

The image is cut into chunks of `chunk` bytes (a multiple of the 4096-byte flash block). Each
chunk is compressed on its own (raw deflate, window 2**wbits: the device needs only that much
RAM to inflate) and/or encrypted on its own (AES-256-CBC, IV = release IV with its last four
bytes XORed with the chunk index, zero padding to 16 bytes), so the device can resume at any
chunk boundary. The manifest lists each chunk's payload size and the first 16 bytes of its
SHA-256: the device authenticates every chunk as it arrives (device/ota/payload.py).
"""
from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import MpotaError

DEFAULT_CHUNK = 64 * 1024
DEFAULT_WBITS = 10
AES_KEY_LEN = 32


def aes_keyid(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


def generate_aes_key(path: Path, force: bool = False) -> str:
    path = Path(path)
    if path.exists() and not force:
        raise MpotaError(f"{path} already exists", hint="use --force to replace it (old releases then cannot be decrypted)")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(AES_KEY_LEN)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return aes_keyid(key)


def load_aes_key(path: Path) -> bytes:
    try:
        text = Path(path).read_text().strip()
        key = bytes.fromhex(text)
    except (OSError, ValueError, UnicodeDecodeError):
        raise MpotaError(f"{path} is not an AES key file (64 hex digits)",
                         hint="make one with: mpota keygen --aes keys/firmware.aes") from None
    if len(key) != AES_KEY_LEN:
        raise MpotaError(f"{path} holds {len(key)} bytes; AES-256 needs 32")
    return key


def chunk_iv(iv: bytes, k: int) -> bytes:
    return iv[:12] + bytes(a ^ b for a, b in zip(iv[12:], k.to_bytes(4, "big")))


def _pad16(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 16)


def encode(image: bytes, *, compress: bool, aes_key: bytes | None, chunk: int = DEFAULT_CHUNK,
           wbits: int = DEFAULT_WBITS) -> tuple[bytes, dict]:
    """-> (payload bytes, the manifest's payload fields other than url)."""
    if chunk % 4096 or not 4096 <= chunk <= 0x100000:
        raise MpotaError(f"chunk size {chunk} must be a multiple of 4096 from 4K to 1M")
    if not 9 <= wbits <= 15:
        raise MpotaError("wbits must be 9..15 (the device needs 2**wbits bytes to inflate)")
    iv = os.urandom(16) if aes_key else None
    parts, table = [], []
    for k, off in enumerate(range(0, len(image), chunk)):
        data = image[off:off + chunk]
        if compress:
            c = zlib.compressobj(9, zlib.DEFLATED, -wbits, 9)
            data = c.compress(data) + c.flush()
        if aes_key:
            enc = Cipher(algorithms.AES(aes_key), modes.CBC(chunk_iv(iv, k))).encryptor()
            data = enc.update(_pad16(data)) + enc.finalize()
        parts.append(data)
        table.append([len(data), hashlib.sha256(data).hexdigest()[:32]])
    payload = b"".join(parts)
    fields = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
              "encoding": "deflate" if compress else "raw", "chunk": chunk, "chunks": table}
    if compress:
        fields["wbits"] = wbits
    if aes_key:
        fields["encryption"] = {"alg": "aes-256-cbc", "keyid": aes_keyid(aes_key), "iv": iv.hex()}
    return payload, fields


def decode(payload: bytes, fields: dict, image_size: int, aes_key: bytes | None) -> bytes:
    """The image back from a chunked payload (host-side verification); checks every chunk."""
    enc = fields.get("encryption")
    if enc and aes_key is None:
        raise MpotaError("the payload is encrypted", hint="pass --aes KEYFILE to check the image inside")
    if enc and aes_keyid(aes_key) != enc["keyid"]:
        raise MpotaError(f"payload is encrypted with key {enc['keyid']}, not {aes_keyid(aes_key)}")
    out, pos = [], 0
    chunk = fields["chunk"]
    for k, (size, digest) in enumerate(fields["chunks"]):
        data = payload[pos:pos + size]
        pos += size
        if hashlib.sha256(data).hexdigest()[:32] != digest:
            raise MpotaError(f"chunk {k} differs from the manifest's digest")
        if enc:
            d = Cipher(algorithms.AES(aes_key), modes.CBC(chunk_iv(bytes.fromhex(enc["iv"]), k))).decryptor()
            data = d.update(data) + d.finalize()
        want = min(chunk, image_size - k * chunk)
        if fields["encoding"] == "deflate":
            data = zlib.decompressobj(-fields["wbits"]).decompress(data)
        out.append(data[:want])
    return b"".join(out)
