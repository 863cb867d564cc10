"""--port is optional for `mpota flash` and `mpota deploy` when exactly one likely board is
attached (esptool's and mpremote's way): the chooser over a stand-in for pyserial's port list."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from mpota import MpotaError, cli, serialports


@dataclass
class FakePort:  # the fields of pyserial's ListPortInfo that mpota reads
    device: str
    vid: int | None = None
    pid: int | None = None
    description: str = "n/a"


CP2102 = FakePort("/dev/ttyUSB0", 0x10C4, 0xEA60, "CP2102 USB to UART Bridge Controller")
S3_NATIVE = FakePort("/dev/ttyACM0", 0x303A, 0x1001, "USB JTAG/serial debug unit")
CH340 = FakePort("/dev/ttyUSB1", 0x1A86, 0x7523, "USB Serial")
FTDI = FakePort("/dev/ttyUSB2", 0x0403, 0x6001, "FT232R USB UART")
BUILTIN = FakePort("/dev/ttyS0")
MOUSE = FakePort("/dev/ttyACM1", 0x046D, 0xC52B, "Logitech receiver")


@pytest.mark.parametrize("board", [CP2102, S3_NATIVE, CH340, FTDI], ids=lambda p: p.device)
def test_the_one_likely_board_is_chosen(board):
    port, why = serialports.choose_port([BUILTIN, board, MOUSE])
    assert port == board.device and "the only likely board" in why


def test_no_board_lists_what_was_found():
    with pytest.raises(MpotaError) as e:
        serialports.choose_port([BUILTIN, MOUSE])
    assert "no ESP32 board found" in str(e.value) and "/dev/ttyS0" in str(e.value) and "046d:c52b" in str(e.value)
    assert "--port" in e.value.hint
    with pytest.raises(MpotaError, match=r"serial ports: none"):
        serialports.choose_port([])


def test_several_boards_are_listed_and_none_is_guessed():
    with pytest.raises(MpotaError) as e:
        serialports.choose_port([CP2102, BUILTIN, S3_NATIVE])
    msg = str(e.value)
    assert "2 likely boards" in msg and "/dev/ttyUSB0 (Silicon Labs CP210x, 10c4:ea60)" in msg
    assert "/dev/ttyACM0 (Espressif" in msg and "ttyS0" not in msg and e.value.hint == "choose one with --port"


@pytest.fixture
def ports(monkeypatch):
    found = []
    monkeypatch.setattr(serialports, "list_ports", lambda: list(found))
    return found


def test_flash_and_deploy_use_the_found_port(ports, monkeypatch, firmware, keydir, tmp_path, capsys):
    from mpota import deploy, flashing
    calls = {}
    monkeypatch.setattr(flashing, "flash", lambda p, port, *a, **k: calls.setdefault("flash", port))

    def probe(port):
        calls["probe"] = port
        raise MpotaError("stop here")
    monkeypatch.setattr(deploy, "probe", probe)
    ports += [BUILTIN, CP2102]
    assert cli.main(["flash", str(firmware("1.0.0")), "--board", "esp32", "--out", str(tmp_path / "o")]) == 0
    assert calls["flash"] == "/dev/ttyUSB0"
    assert "port /dev/ttyUSB0 (Silicon Labs CP210x" in capsys.readouterr().out
    assert cli.main(["deploy", "--pub", str(keydir / "release.pub"), "--server", "http://h:1"]) == 2
    assert calls["probe"] == "/dev/ttyUSB0"
    ports.append(S3_NATIVE)
    assert cli.main(["deploy", "--pub", str(keydir / "release.pub"), "--server", "http://h:1"]) == 2
    err = capsys.readouterr().err
    assert "2 likely boards are attached" in err and "choose one with --port" in err
    ports.clear()
    assert cli.main(["flash", str(firmware("1.0.0")), "--board", "esp32", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no ESP32 board found" in err and "--port" in err and "--dry-run checks everything without a board" in err
