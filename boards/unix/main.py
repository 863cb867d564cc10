# main.py of a simulated device, written by `mpota sim create`. A real board's main.py makes
# the same two calls: confirm first thing, then the application, which updates when it suits.
import ota
import firmware  # the simulated firmware: selftest() fails in images built --behavior unhealthy


def health():
    # Your real check goes here: sensors answer, the network comes up, the server is reachable.
    return firmware.selftest()


ota.confirm(health, timeout_ms=10000)
ota.update()
