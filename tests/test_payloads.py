"""Compressed and encrypted payloads, end to end on the simulated device, and their refusals."""
from __future__ import annotations

import json

import pytest

from mpota import payload, release


@pytest.fixture
def aes(tmp_path):
    payload.generate_aes_key(tmp_path / "fw.aes")
    payload.generate_aes_key(tmp_path / "other.aes")
    return tmp_path / "fw.aes", tmp_path / "other.aes"


@pytest.mark.parametrize("compress,encrypt", [(True, False), (False, True), (True, True)],
                         ids=["deflate", "aes", "deflate+aes"])
def test_chunked_payload_installs(compress, encrypt, server, firmware, signer, make_device, aes):
    key = payload.load_aes_key(aes[0]) if encrypt else None
    img = firmware("2.0.0", size=200 * 1024)
    rel = server.publish(img, signer, compress=compress, aes_key=key, chunk=32 * 1024)
    p = rel.manifest["payload"]
    assert len(p["chunks"]) == 7
    if compress:
        assert p["size"] < 0.9 * len(img.read_bytes())
    d = make_device(firmware("1.0.0"), server.url, aes_keys=[aes[0]] if encrypt else [])
    d.run()
    st = d.status()
    assert st["version"] == "2.0.0" and st["last_error"] is None, d.output
    assert d.slot_bytes(1, len(img.read_bytes())) == img.read_bytes()


def _encrypted(server, firmware, signer, aes):
    return server.publish(firmware("2.0.0"), signer, aes_key=payload.load_aes_key(aes[0]), chunk=16 * 1024)


@pytest.mark.parametrize("case,device_keys,damage,code", [
    ("missing key on the device", [], None, "missing-key"),
    ("wrong key on the device", [1], None, "wrong-key"),
    ("tampered ciphertext", [0], "flip", "hash-mismatch"),
    ("truncated ciphertext", [0], "truncate", "truncated"),
])
def test_encrypted_refusals(case, device_keys, damage, code, server, firmware, signer, make_device, aes):
    rel = _encrypted(server, firmware, signer, aes)
    path = server.root / rel.manifest["payload"]["url"]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        data = data[:-100]
    path.write_bytes(data)
    d = make_device(firmware("1.0.0"), server.url, aes_keys=[aes[i] for i in device_keys])
    before = d.otadata()
    d.run()
    st = d.status()
    assert st["last_error"] == code, d.output
    assert st["version"] == "1.0.0" and d.otadata() == before
    assert d.slot_bytes(1, 1) == b"\xff"


def test_compressed_chunk_with_bad_data_but_valid_digest_is_refused(server, firmware, signer, make_device):
    # A correctly signed manifest whose chunk is not valid deflate data: bad-payload, not a crash.
    rel = server.publish(firmware("2.0.0"), signer, compress=True, chunk=16 * 1024)
    path = server.root / rel.manifest["payload"]["url"]
    data = bytearray(path.read_bytes())
    first = rel.manifest["payload"]["chunks"][0][0]
    data[:first] = bytes([0xFF]) * first  # invalid deflate block type
    path.write_bytes(data)
    import hashlib
    m = json.loads(rel.body)
    m["payload"]["chunks"][0][1] = hashlib.sha256(bytes(data[:first])).hexdigest()[:32]
    m["payload"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    server.write_manifest_body(m, signer)
    d = make_device(firmware("1.0.0"), server.url)
    d.run()
    assert d.status()["last_error"] == "bad-payload", d.output


def test_host_verify_checks_the_image_inside(tmp_path, firmware, signer, aes):
    key = payload.load_aes_key(aes[0])
    rel = release.build(firmware("2.0.0"), tmp_path / "r", [signer], compress=True, aes_key=key)
    pub = [signer.public_key()]
    release.verify(tmp_path / "r", pub, key)
    release.verify(tmp_path / "r", pub)  # without the key: signature and ciphertext only
    with pytest.raises(release.ReleaseError, match="not"):
        release.verify(tmp_path / "r", pub, payload.load_aes_key(aes[1]))
    assert rel.manifest["payload"]["encryption"]["keyid"] == payload.aes_keyid(key)
