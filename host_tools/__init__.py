"""mpota host tools: keys, signing, releases, update server, simulator, flashing, deploying."""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# The device agent and the board definitions: inside the package when it is installed (pip
# install ., a wheel: mpota/device, mpota/boards), beside it in a checkout (editable install).
_HERE = Path(__file__).resolve().parent
ROOT = _HERE if (_HERE / "device").is_dir() else _HERE.parent
DEVICE_DIR = ROOT / "device"
BOARDS_DIR = ROOT / "boards"


class MpotaError(Exception):
    """A user-facing error: the CLI prints it with its hint and exits with status 2."""

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.hint = hint


def read_input(path, what: str = "", hint: str | None = None, error: type = MpotaError) -> bytes:
    """The bytes of a file the user named; a clear `error` (with `hint`) if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise error(f"cannot read {what + ' ' if what else ''}{path}: {e.strerror}", hint=hint) from None
