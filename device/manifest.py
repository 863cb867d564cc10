# Freeze the mpota agent into a MicroPython firmware build (frozen bytecode costs no heap):
#   include("$(MPY_DIR)/../mpota/device/manifest.py")   in your board's manifest.py
metadata(description="mpota: secure OTA updates for MicroPython on ESP32", version="0.1.0")
# The agent has its own bounded HTTP client (ota/http.py); it needs no requests.
package("ota")
