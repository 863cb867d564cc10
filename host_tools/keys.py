"""Ed25519 release keys: generate, load, key ids.

Private keys are PEM (PKCS#8) files written with mode 0600 and never printed; public keys are
PEM (SubjectPublicKeyInfo). A key id is the first 16 hex digits of SHA-256 over the raw 32-byte
public key, as the DSSE envelope and the device config use it. load(path, role) reads a key for
its role ("private": signing; "public": trusting) and refuses a key of the other role.
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


ROLES = ("private", "public")  # signing a release; trusting releases (devices, verify)


def load(path: Path, role: str) -> Ed25519PrivateKey | Ed25519PublicKey:
    """The key in `path` for `role`, refusing a key of the other role with how to fix it.

    A private key where a public key belongs (`--pub keys/release`) is refused rather than
    reduced to its public half: a config, a device or a script that takes it would end up
    holding or copying the signing key."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}")
    data = read_input(path, f"{role} key",
                      hint="make one with: mpota keygen keys/release" if role == "private" else
                      "pass the .pub file that `mpota keygen` wrote")
    private = b"PRIVATE KEY" in data
    if role == "public" and private:
        raise MpotaError(f"{path} is a private key; a trusted key must be the public one",
                         hint=f"pass {Path(path).name}.pub (`mpota keygen` wrote both); the private key "
                              "stays on the signing machine and never goes to a device")
    try:
        if role == "private":
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        if role == "private" and b"PUBLIC KEY" in data:
            raise MpotaError(f"{path} is a public key; signing needs the private key",
                             hint="pass the file without .pub") from None
        if role == "private":
            raise MpotaError(f"{path} is not an unencrypted PEM private key") from None
        raise MpotaError(f"{path} is not a PEM public key",
                         hint="pass the .pub file that `mpota keygen` wrote") from None
    if not isinstance(key, (Ed25519PrivateKey, Ed25519PublicKey)):
        raise MpotaError(f"{path} is not an Ed25519 {'key' if role == 'private' else 'public key'}")
    return key


def load_private(path: Path) -> Ed25519PrivateKey:
    return load(path, "private")


def load_public(path: Path) -> Ed25519PublicKey:
    return load(path, "public")
