"""ESP app images: what we build, esptool (the independent reader) accepts; what is broken,
we refuse."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from esptool.bin_image import LoadFirmwareImage

from conftest import SHARED
from mpota import espimage

ESPTOOL = str(Path(sys.executable).parent / "esptool")


@pytest.mark.parametrize("chip", ["esp32", "esp32s3", "esp32c3"])
def test_esptool_image_info_accepts_simulated_firmware(chip, firmware):
    path = firmware("4.5.6", "unhealthy", chip=chip, secure_version=3)
    out = subprocess.run([ESPTOOL, "--chip", chip, "image-info", str(path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert "App version: 4.5.6" in out.stdout
    assert "Checksum: " in out.stdout and "(valid)" in out.stdout
    assert "Validation hash: " in out.stdout and "(valid)" in out.stdout
    assert "Secure version: 3" in out.stdout
    info = espimage.parse(path.read_bytes())
    assert (info.chip, info.version, info.secure_version, info.behavior) == (chip, "4.5.6", 3, "unhealthy")


def test_esptool_loader_agrees_on_segments(firmware):
    path = firmware("1.0.0")
    img = LoadFirmwareImage("esp32", str(path))
    assert len(img.segments) == 2
    assert img.segments[0].addr == 0x3F400020
    assert img.checksum == img.calculate_checksum()


@pytest.mark.parametrize("damage,message", [
    (lambda b: b.__setitem__(0, 0xE8), "magic"),
    (lambda b: b.__setitem__(slice(None), b[:200]), "too short"),
    (lambda b: b.__setitem__(10000, b[10000] ^ 1), "checksum"),
    (lambda b: b.__setitem__(len(b) - 1, b[-1] ^ 1), "SHA-256"),
])
def test_parse_refuses_broken_images(damage, message, firmware):
    data = bytearray(firmware("1.0.0").read_bytes())
    damage(data)
    with pytest.raises(espimage.ImageError, match=message):
        espimage.parse(bytes(data))


def test_parse_refuses_an_image_without_app_description():
    data = espimage.build([(0x3F400020, b"\0" * 512)], "esp32", 0x40080000)
    with pytest.raises(espimage.ImageError, match="esp_app_desc_t"):
        espimage.parse(data)


def test_real_esp8266_firmware_is_refused_as_not_an_esp32_app(tmp_path):
    path = SHARED / "firmware" / "esp8266-20190125-v1.10.bin"
    if not path.exists():
        pytest.skip("../shared/firmware is absent (a user's own clone)")
    with pytest.raises(espimage.ImageError):
        espimage.parse(path.read_bytes())
