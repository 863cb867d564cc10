"""The simulated ESP32: a unix-port MicroPython with a file-backed flash (boards/unix)."""
