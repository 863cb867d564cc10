# mpota device agent: the public API.
#
#   import ota
#   ota.confirm(health)   # early in main.py: a new image stays only if health() passes in time
#   ota.update()          # check the manifest, download, verify, set_boot, record, reset
#   ota.check()           # manifest only: what would be installed, and why or why not
#   ota.status()          # running slot, version, OTA state of each slot, last result
#
# Importing this module loads nothing else: each call imports only what it needs, so the
# confirm path on every boot stays small (ota/trial.py), and the updater, HTTP client and
# Ed25519 verifier are loaded only when an update is checked. No submodule is named after a
# function here: importing ota.x sets the package's attribute x to the module, which would
# replace the function (a second ota.status() would fail).


def confirm(health=None, timeout_ms=30000):
    from ota.trial import confirm as _confirm
    return _confirm(health, timeout_ms)


def update(reboot=True):
    # The update's one 4 KiB block buffer is taken first, while the heap is least fragmented,
    # and with it a 2 KiB reserve that is let go just before a compressed payload's inflater
    # allocates its window; the updater's code loads after them (many small allocations fit
    # where 4 KiB would not). See docs/memory.md.
    import gc
    gc.collect()
    buf = bytearray(4096)
    reserve = bytearray(2048)
    from ota.updater import update as _update
    return _update(reboot, buf, reserve)


def check():
    from ota.updater import check as _check
    return _check()


def status():
    from ota.summary import status as _status
    return _status()
