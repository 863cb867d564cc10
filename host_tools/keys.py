"""Ed25519 release keys: generate, load, key ids.

Private keys are PEM (PKCS#8) files written with mode 0600 and never printed; public keys are
PEM (SubjectPublicKeyInfo). A key id is the first 16 hex digits of SHA-256 over the raw 32-byte
public key, as the DSSE envelope and the device config use it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import MpotaError, read_input


def raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keyid(pub: Ed25519PublicKey | bytes) -> str:
    raw = pub if isinstance(pub, bytes) else raw_public(pub)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate(path: Path, force: bool = False) -> str:
    """Write `path` (private, 0600) and `path.pub`; return the key id."""
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    for p in (path, pub_path):
        if p.exists() and not force:
            raise MpotaError(f"{p} already exists", hint="use --force to replace it (the old key is lost)")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return keyid(key.public_key())


def load_private(path: Path) -> Ed25519PrivateKey:
    data = read_input(path, "private key", hint="make one with: mpota keygen keys/release")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        if b"PUBLIC KEY" in data:
            raise MpotaError(f"{path} is a public key; signing needs the private key",
                             hint="pass the file without .pub") from None
        raise MpotaError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise MpotaError(f"{path} is not an Ed25519 key")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    """A public key from a .pub PEM file (a private key file is accepted and reduced to its public half)."""
    data = read_input(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        if b"PRIVATE KEY" not in data:
            raise MpotaError(f"{path} is not a PEM public key",
                             hint="pass the .pub file that `mpota keygen` wrote") from None
        key = load_private(path).public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise MpotaError(f"{path} is not an Ed25519 public key")
    return key
