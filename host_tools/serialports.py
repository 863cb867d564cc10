"""Which serial port the board is on, when none is given (`mpota flash`, `mpota deploy`), the way
esptool and mpremote find one: among the ports pyserial lists, those of a USB bridge that ESP32
boards use. Exactly one -> that port; none or several -> an error that lists what was found.
"""
from __future__ import annotations

from . import MpotaError

# USB vendor ids of the bridges on ESP32 boards (esptool and mpremote look for the same).
KNOWN_VIDS = {
    0x303A: "Espressif USB (USB-Serial/JTAG, native USB)",
    0x10C4: "Silicon Labs CP210x",
    0x1A86: "WCH CH34x",
    0x0403: "FTDI",
}


def what(port) -> str:
    """'Silicon Labs CP210x, 10c4:ea60' for a pyserial ListPortInfo."""
    vid, pid = getattr(port, "vid", None), getattr(port, "pid", None)
    name = KNOWN_VIDS.get(vid) or (getattr(port, "description", None) or "").strip()
    ids = f"{vid:04x}:{pid or 0:04x}" if vid is not None else "no USB id"
    return f"{name + ', ' if name and name != 'n/a' else ''}{ids}"


def describe(port) -> str:
    """'/dev/ttyUSB0 (Silicon Labs CP210x, 10c4:ea60)'."""
    return f"{port.device} ({what(port)})"


def likely_boards(ports) -> list:
    """The ports that are one of the known USB bridges."""
    return [p for p in ports if getattr(p, "vid", None) in KNOWN_VIDS]


def list_ports() -> list:
    from serial.tools import list_ports as lp
    return sorted(lp.comports(), key=lambda p: p.device)


def choose_port(ports=None, option: str = "--port", also: str = "") -> tuple[str, str]:
    """(port, why) for the one likely board among `ports` (default: what pyserial finds);
    MpotaError listing what was found when there is none or more than one (`also`: more of the
    hint, e.g. what works without a board)."""
    ports = list_ports() if ports is None else list(ports)
    likely = likely_boards(ports)
    if len(likely) == 1:
        return likely[0].device, f"{what(likely[0])}, the only likely board attached"
    if not likely:
        others = ", ".join(describe(p) for p in ports) or "none"
        raise MpotaError(f"no ESP32 board found on a serial port (serial ports: {others})",
                         hint=f"plug the board in (a data cable, not a charging-only one) and try again, or give "
                              f"{option} (e.g. {option} /dev/ttyUSB0, /dev/ttyACM0, COM3); on Linux you may need "
                              "the dialout group" + also)
    raise MpotaError(f"{len(likely)} likely boards are attached: " + ", ".join(describe(p) for p in likely),
                     hint=f"choose one with {option}" + also)
