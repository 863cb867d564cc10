# machine for the simulated ESP32: the unix port's `machine` has no reset(). This module,
# earlier on sys.path, shadows the built-in; reset() ends the micropython process with
# RESET_EXIT so the simulator runs the bootloader and boots again.
import sys

RESET_EXIT = 100


def reset():
    sys.exit(RESET_EXIT)


def soft_reset():
    sys.exit(RESET_EXIT)


def unique_id():
    return b"\x24\x0a\xc4\x00\x00\x01"


def reset_cause():
    return 1  # PWRON_RESET
