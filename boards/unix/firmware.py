# The simulated firmware's start-up on the unix board: what MicroPython's ESP32 port does after
# the bootloader hands over (ports/esp32/main.c, mp_task: boot.py, then main.py, then the REPL),
# plus the behaviour that the simulated image carries in its marker (MPOTA_BEHAVIOR):
#   healthy    runs main.py; selftest() passes
#   unhealthy  runs main.py; selftest() returns False (a broken driver in the new firmware)
#   crash      panics before main.py runs: the panic handler resets the chip (exit PANIC_EXIT)
#   raise      init() raises: an uncaught exception in main.py before ota.confirm()
#   hang       init() never returns: a hang before ota.confirm()
#   stuck      selftest() never returns: a health check that hangs
# main.py on the simulator calls firmware.init() and uses firmware.selftest() as its health check.
#
# As on the board, an uncaught exception in boot.py or main.py is printed and the board waits at
# the REPL (main.py does not run after a failed boot.py): nothing resets it (exit REPL_EXIT tells
# the simulator so; it resets the board only if a machine.WDT is armed).
import os
import sys

PANIC_EXIT = 102
SOFT_RESET_EXIT = 103
REPL_EXIT = 105
behavior = os.getenv("MPOTA_BEHAVIOR") or "healthy"
version = os.getenv("MPOTA_VERSION") or "?"


def _forever():
    import time
    while True:
        time.sleep_ms(1000)


def init():
    if behavior == "raise":
        raise RuntimeError("driver init failed (simulated firmware %s)" % version)
    if behavior == "hang":
        _forever()


def selftest():
    if behavior == "stuck":
        _forever()
    return behavior != "unhealthy"


def _run(path):
    # pyexec_file_if_exists(): True if the file ran to its end (or is absent), False after an
    # uncaught exception (printed). SystemExit: the simulator's own exits (reset, power loss,
    # ...) end the process; any other (sys.exit() in a script) is a soft reset, as on the board.
    try:
        src = open(path).read()
    except OSError:
        return True
    try:
        exec(src, {"__name__": "__main__"})
        return True
    except SystemExit as e:
        code = e.args[0] if e.args else None
        if isinstance(code, int) and 100 <= code <= 105:
            raise
        sys.exit(SOFT_RESET_EXIT)
    except BaseException as e:  # an uncaught exception (or Ctrl-C) in the script
        sys.print_exception(e)
        return False


def _board_startup():
    # ARDUINO_NANO_ESP32's NANO_ESP32_board_startup() (MICROPY_BOARD_STARTUP, before mp_task):
    # if esp_ota_get_state_partition(running) is PENDING_VERIFY, it calls
    # esp_ota_mark_app_valid_cancel_rollback() (the result is ignored).
    import idf
    slots = idf.ota_slots()
    label = os.getenv("MPOTA_RUNNING")
    for i in range(len(slots)):
        if slots[i][4] == label and idf.state_of_slot(i, len(slots)) == idf.PENDING_VERIFY:
            try:
                idf.mark_running_valid()
            except OSError:
                pass


def start():
    if os.getenv("MPOTA_FS") in ("fat", "littlefs"):  # _boot.py: mount the filesystem in the flash
        import simfs
        simfs.mount()
    if os.getenv("MPOTA_BOARD_CONFIRMS") == "1":
        _board_startup()
    if behavior == "crash":
        print("firmware %s: Guru Meditation Error: Core 0 panic'ed (simulated crash at boot)" % version)
        sys.exit(PANIC_EXIT)
    # mp_task(): boot.py; main.py only if boot.py ran to its end; then the REPL
    if not _run("boot.py") or not _run("main.py"):
        print("MicroPython %s; at the REPL after an uncaught exception" % version)
        sys.exit(REPL_EXIT)


if __name__ == "__main__":
    start()
