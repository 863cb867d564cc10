# The manifest stage's set-up (ota/updater.py), as a call of its own: the config for this call
# (a release URL or "serial:" in place of the configured sources), the device's name in its
# fetches (ota/ident.py), and the whole call's deadline. None of it is in the heap when a
# signature is checked.
from ota.errors import OtaError, DEVICE


def for_call(st, source=None):
    # The config of this call (ota/config.py's parser forgotten once it is read), with its
    # deadline set (ota._until).
    import ota
    try:
        from ota import config
        cfg = config.load()
        if source is not None:
            if not isinstance(source, str) or not source:
                raise OtaError("bad-url", "source must be a release URL or \"serial:\"", DEVICE)
            cfg.manifest_urls = [config.manifest_url(source)]
    finally:
        config = None
        ota._drop(("ota.config",))  # the Config object stays; the parser goes
    if cfg.announce:  # the device names itself in its manifest fetches (ota/ident.py)
        cfg.agent = ota._call("ident", "announce", cfg, st)
    import time
    # http.limit(), without loading ota.http for it: a module held by this frame would stay in
    # the heap through the whole stage, the signature check included
    ota._until = time.ticks_add(time.ticks_ms(), _budget_ms(cfg))
    return cfg


def _budget_ms(cfg):
    # The whole update() call's deadline, from the config: each source's manifest within 4
    # timeouts (connect and TLS handshake: 2, headers: 1, body: 1), and its rollout document
    # within 4 more (with a rollout role), and a payload as large as the slot at the minimum
    # rate (4 KiB per 2 timeouts) with room for one interruption.
    from ota import slots
    blocks = slots.running().get_next_update().info()[3] // 4096
    per = 4 if cfg.rollout_keys is None else 8
    return (len(cfg.manifest_urls) * per + blocks * 2 + 8) * cfg.timeout_s * 1000
