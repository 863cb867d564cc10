"""The agent is installable the MicroPython ways: mip's package.json and a freezing manifest."""
import json
from pathlib import Path

DEVICE = Path(__file__).resolve().parents[1] / "device"


def test_package_json_lists_every_agent_module():
    pkg = json.loads((DEVICE / "package.json").read_text())
    listed = sorted(dest for dest, _src in pkg["urls"])
    on_disk = sorted(f"ota/{p.name}" for p in (DEVICE / "ota").glob("*.py"))
    assert listed == on_disk
    assert all(src.endswith(dest) for dest, src in pkg["urls"])


def test_freeze_manifest_names_the_package():
    text = (DEVICE / "manifest.py").read_text()
    assert 'package("ota")' in text
