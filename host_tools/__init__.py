"""mpota host tools: keys, signing, releases, update server, simulator, flashing, deploying."""
from pathlib import Path

__version__ = "0.1.0"

# The checkout this package runs from (installed editable): device/ and boards/ live here.
ROOT = Path(__file__).resolve().parent.parent
DEVICE_DIR = ROOT / "device"
BOARDS_DIR = ROOT / "boards"


class MpotaError(Exception):
    """A user-facing error: the CLI prints it with its hint and exits with status 2."""

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.hint = hint
