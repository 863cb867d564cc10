# main.py for an ESP32 board running the mpota agent (installed by `mpota deploy` when the board
# has no main.py yet). Three calls matter, and their order:
#   1. ota.guard() first of all: on the first boot of a new firmware it arms the watchdog, so
#      that an exception (which leaves a board at the REPL) or a hang before confirm() resets
#      the board and the bootloader rolls back. On every other boot it does nothing.
#   2. ota.confirm(health) once the application's start-up is done: a new firmware is kept only
#      if health() passes in time (the board then restarts once, so the watchdog is gone);
#      otherwise the board resets and the previous firmware comes back.
#   3. ota.update() whenever it suits the application: check, download, verify, install, reset.
# Replace the "application" part with yours; keep the three calls.
import ota
ota.guard()
import time

# Wi-Fi: wifi.json ({"ssid": ..., "password": ...}, written by `mpota deploy --wifi SSID`), or
# bring the network up yourself in boot.py and delete this part.
_CHECK_EVERY_S = 60  # how often the example asks the server for a release (production: hours)


def wifi():
    import network
    sta = network.WLAN(network.STA_IF)
    sta.active(True)
    if not sta.isconnected():
        try:
            import json
            with open("wifi.json") as f:
                cfg = json.load(f)
            sta.connect(cfg["ssid"], cfg.get("password", ""))
        except OSError:
            print("main: no wifi.json; configure the network in boot.py")
    return sta


sta = wifi()


def health():
    # Your real check: sensors answer, the network comes up, the server is reachable.
    # True = healthy, False = not, None = not decided yet (asked again every 100 ms until
    # confirm's timeout). A firmware that cannot reach the network can never receive a fix,
    # so here "healthy" means at least "Wi-Fi connected within the timeout".
    return True if sta.isconnected() else None


ota.confirm(health, timeout_ms=30000)
st = ota.status()
print("main: firmware", st["version"] or "(no version)", "in", st["slot"], "- last update:",
      st["last_result"], st["last_error"] or "", st["detail"] or "")

# ---- the application ----------------------------------------------------------------------
while True:
    # ... your work here ...
    r = ota.update()  # resets into the new firmware after an install; otherwise returns
    if r and r.get("error"):
        print("main: update:", r)
    time.sleep(_CHECK_EVERY_S)
