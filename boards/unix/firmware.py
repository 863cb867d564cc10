# The simulated firmware's start-up on the unix board: what MicroPython's ESP32 port does after
# the bootloader hands over (run boot.py, then main.py), plus the behaviour that the simulated
# image carries in its marker (the simulator passes it in MPOTA_BEHAVIOR):
#   healthy    runs main.py; selftest() passes
#   unhealthy  runs main.py; selftest() fails (e.g. a broken driver in the new firmware)
#   crash      panics before main.py runs (no chance to confirm): exit PANIC_EXIT
# main.py on the simulator uses firmware.selftest() as (part of) its health check.
import os
import sys

PANIC_EXIT = 102
behavior = os.getenv("MPOTA_BEHAVIOR") or "healthy"
version = os.getenv("MPOTA_VERSION") or "?"


def selftest():
    return behavior != "unhealthy"


def _run(path):
    try:
        src = open(path).read()
    except OSError:
        return
    exec(src, {"__name__": "__main__"})


def start():
    if behavior == "crash":
        print("firmware %s: Guru Meditation Error: Core 0 panic'ed (simulated crash at boot)"
              % version)
        sys.exit(PANIC_EXIT)
    _run("boot.py")
    _run("main.py")


if __name__ == "__main__":
    start()
