# mpota device agent: the public API.
#
#   import ota
#   ota.guard()           # first line of main.py: a new image's first boot runs under a watchdog
#   ota.confirm(health)   # early in main.py: a new image stays only if health() passes in time
#   ota.update()          # check the manifest, download, verify, set_boot, record, reset
#   ota.check()           # manifest only: what would be installed, and why or why not
#   ota.status()          # running slot, version, OTA state of each slot, last result
#   ota.forget(version)   # the owner's way out: try a rejected release again
#
# Importing this module loads nothing else: each call imports only what it needs, so the
# confirm path on every boot stays small (ota/trial.py), and the updater, HTTP client and
# Ed25519 verifier are loaded only when an update is checked. No submodule is named after a
# function here: importing ota.x sets the package's attribute x to the module, which would
# replace the function (a second ota.status() would fail).
#
# And each call forgets the modules it loaded before it returns (update() does so between its
# two stages too): the agent's code and data would otherwise stay in the application's heap for
# good (the next call loads them again, a few ms). ota._sha512_viper stays: it is machine code, which an
# ESP32 keeps in executable RAM that the garbage collector does not reclaim.
import sys

_RESIDENT = ("ota._sha512_viper",)
# True once update() has an image set to boot (ota/install.py after set_boot(), ota/apply.py for
# one a cut-short call left): from then on the reset comes whatever the heap still allows.
# Defined here so that setting it allocates nothing.
_set_to_boot = False


def _unload(keep):
    _drop([n for n in sys.modules if n.startswith("ota.") and n not in keep and n not in _RESIDENT])


def _drop(names):
    # Forget these modules (and the attributes their import set on the package), then collect:
    # after every API call (_unload), and within a stage (ota/verify.py: the HTTP client, the
    # envelope parser).
    g = globals()
    for name in names:
        if name in sys.modules:
            del sys.modules[name]
            if type(g.get(name[4:])) is type(sys):
                del g[name[4:]]
    import gc
    gc.collect()


def _call(module, fn, *args):
    # Run ota.<module>.<fn>(*args), then forget every module of the agent the call loaded (only
    # those are ever forgotten, so only their names are kept meanwhile: calls nest).
    keep = [n for n in sys.modules if n.startswith("ota.")]
    try:
        return getattr(__import__("ota." + module, None, None, (fn,)), fn)(*args)
    finally:
        _unload(keep)


def _no_memory(what):
    # An import or buffer the call needs did not fit: say so (in the state file too, if that
    # still fits) instead of raising into the application.
    detail = "out of heap " + what
    try:
        from ota import state
        st = state.load()
        state.record(st, "failed", "no-memory", detail)
        state.save(st)
    except Exception:
        pass
    _report("event", "no-memory", "no-memory", detail)
    return {"result": "failed", "error": "no-memory", "detail": detail}


def _fleet(module, fn, *args):
    # ota.<module>.<fn>(*args) if the device has a fleet server: "fleet" in ota_config.json, read
    # once per start (ota/ident.py; the answer stays here as _fl). Loaded for the call and
    # forgotten after, like everything else; never raises into the caller.
    try:
        if globals().get("_fl") is None:
            _call("ident", "settings")
        if globals().get("_fl"):
            _call(module, fn, *args)
    except Exception as e:  # MemoryError too: a report is not worth an update or an application
        print("ota: fleet: %r" % (e,))


def _report(fn, *args):
    # Queue a fleet report (ota/report.py; the hooks in ota/apply.py and ota/trial.py).
    _fleet("report", fn, *args)


def _send():
    # The queued reports, sent as update() and confirm() return, once their own modules and
    # buffers are gone (ota/report.py, ota/fleet.py: within fleet.timeout_s).
    _fleet("report", "flush")


def guard(watchdog_ms=None):
    return _call("trial", "guard", watchdog_ms)


def confirm(health=None, timeout_ms=30000, watchdog_ms=None):
    r = _call("trial", "confirm", health, timeout_ms, watchdog_ms)
    _send()
    return r


def status():
    return _call("summary", "status")


def forget(release=None):
    # The owner's way out: forget that a release was rejected (a version, a manifest digest, or
    # None for all) and any back-off, so the next update() tries it again. Returns the
    # versions forgotten.
    return _call("trial", "forget_rejected", release)


def _buffered(fn, *args):
    # update() and check(): the call's one 4 KiB block buffer is taken first, while the heap is
    # least fragmented; the agent's code loads after it (many small allocations fit where 4 KiB
    # would not). update() runs its stages as calls that each forget their modules: the manifest
    # stage (ota/updater.py), then the payload stage (ota/apply.py), which leaves the download
    # itself to a call of its own (ota/download.py): the signature check, the download and the
    # bookkeeping around it never share the heap. Code that does not fit is an answer, not an
    # exception in the application. See docs/memory.md.
    import gc
    gc.collect()
    try:
        buf = bytearray(4096)
        if fn == "check":
            return _call("query", "check", buf)
        __import__("ota.errors")  # loaded across both stages: one OtaError class for the two
        try:
            begun = _call("updater", "begin", buf, args[1])
            r = _call("apply", "update", buf, begun, args[0])
            if r == "fetch":  # the payload, as a call of its own (ota/download.py), then the rest
                r = _call("apply", "update", buf, begun, args[0], (_call("download", "fetch", buf, begun),))
            return r
        finally:
            _drop(("ota.errors",))
    except MemoryError:
        gc.collect()
        return None


def update(reboot=True, source=None):
    global _set_to_boot, _until
    _set_to_boot = False
    r = _buffered("update", reboot, source)
    _until = None  # the call's deadline (ota/body.py's limit()) ends with it, however it ended
    if _set_to_boot:
        # The image is verified and set to boot (ota/install.py): what ran out of heap after
        # that (a note in the state file, a report) is not a failure of the update, and the
        # reset comes now that both stages' code and the block buffer are gone (docs/memory.md).
        r = r or {"result": "installed", "error": None, "detail": "set to boot; rebooting to confirm"}
        if reboot:
            import machine
            machine.reset()
    r = r or _no_memory("during the update")
    if source and isinstance(source, str) and source.startswith("serial:"):
        import micropython
        micropython.kbd_intr(3)  # ota/link.py switched Ctrl-C off for the binary transfer
    _send()
    return r


def check():
    return _buffered("check") or {"update": False, "error": "no-memory",
                                  "detail": "out of heap loading the updater"}
