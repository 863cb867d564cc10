# machine for the simulated ESP32. The unix port's own `machine` has no reset(), WDT or
# deepsleep(); this module, earlier on sys.path, shadows it. What ends the micropython process
# tells the simulator (host_tools/sim/runner.py) what the board does next:
#   reset()        exit 100: a hard reset; the bootloader runs (esp_restart)
#   soft_reset()   exit 103: MicroPython restarts, the bootloader does not run
#   deepsleep(ms)  exit 104: the chip sleeps and wakes through the bootloader's deep-sleep path
# WDT(timeout=ms) is the task watchdog of ports/esp32/machine_wdt.c: once armed it cannot be
# stopped (a second WDT() only changes the timeout); feed() must come within the timeout or the
# simulator resets the board. The simulator watches the file MPOTA_WDT names: its content is the
# timeout, its modification time the last feed.
# RTC() is ports/esp32/machine_rtc.c's, kept across resets and deep sleep and lost at power-on
# (simrtc.py).
import os
import sys

RESET_EXIT = 100
SOFT_RESET_EXIT = 103
DEEPSLEEP_EXIT = 104

# machine.reset_cause() values of ports/esp32/modmachine.c
PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5


def reset():
    sys.exit(RESET_EXIT)


def soft_reset():
    sys.exit(SOFT_RESET_EXIT)


def deepsleep(ms=0):
    sys.exit(DEEPSLEEP_EXIT)


def reset_cause():
    return int(os.getenv("MPOTA_RESET_CAUSE") or PWRON_RESET)


def unique_id():
    uid = os.getenv("MPOTA_UID")
    if uid:
        from binascii import unhexlify
        return unhexlify(uid)
    return b"\x24\x0a\xc4\x00\x00\x01"


def freq():
    return 160000000


class WDT:
    def __init__(self, id=0, timeout=5000):
        if id != 0:
            raise ValueError
        if timeout <= 0:
            raise ValueError("WDT timeout too short")
        self._timeout = timeout
        self.feed()

    def feed(self):
        path = os.getenv("MPOTA_WDT")
        if path:
            with open(path, "w") as f:
                f.write(str(self._timeout))


def RTC(id=0):
    # machine.RTC (ports/esp32/machine_rtc.c), emulated in simrtc.py: loaded when asked for and
    # not kept in sys.modules, so that it costs the heap nothing between uses (on a board it is
    # C, outside the heap).
    import simrtc
    del sys.modules["simrtc"]
    return simrtc.RTC(id)
