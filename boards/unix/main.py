# main.py of a simulated device, written by `mpota sim create`. A real board's main.py makes the
# same calls (device/examples/main.py): guard first, the firmware's own start-up, confirm, then
# the application, which updates when it suits.
import ota
ota.guard()      # a new image's first boot: the watchdog covers everything until confirm()
import firmware  # the simulated firmware's own code: init() fails in images built --behavior raise
                 # or hang; selftest() fails in --behavior unhealthy, never returns in stuck
firmware.init()


def health():
    # Your real check goes here: sensors answer, the network comes up, the server is reachable.
    return firmware.selftest()


ota.confirm(health, timeout_ms=10000)
ota.update()
