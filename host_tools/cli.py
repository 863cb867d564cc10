"""`mpota`: the command line. Each verb parses and checks its arguments, then calls a plain
function of the mpota package that scripts can import too. One handler turns MpotaError into
"mpota: error: ..." plus a hint, exit status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
from pathlib import Path

from . import MpotaError, __version__
from .espimage import BEHAVIORS
from .sim.device import FS_KINDS, ROLLBACK_MODES


def _human(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1024, "M": 1 << 20}.get(t[-1:], 1)
    try:
        n = int(t.rstrip("KM")) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 131072, 128K or 1M") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return n


def _heap(text: str) -> str:
    n = _size(text)
    if not 16 << 10 <= n <= 64 << 20:
        raise argparse.ArgumentTypeError(f"{text!r}: give 16K to 64M (an ESP32 has about 100K to 150K free)")
    return text.upper().removesuffix("B")


def _chip_rev(text: str) -> int:
    """A chip revision as ESP-IDF writes it, v3.1 or 3.1, as major * 100 + minor."""
    t = text.strip().lower().removeprefix("v")
    major, _, minor = t.partition(".")
    if not (major.isdigit() and (minor.isdigit() or not minor)) or int(minor or 0) > 99 or int(major) > 654:
        raise argparse.ArgumentTypeError(f"{text!r} is not a chip revision like 3.1 (major.minor)")
    return int(major) * 100 + int(minor or 0)


def _counter(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= n <= 0x3FFFFFFF:
        raise argparse.ArgumentTypeError("security counter must be 0..1073741823")
    return n


def _say(a):
    """print() for a command's progress: stdout, or stderr when --json keeps stdout for the JSON."""
    if getattr(a, "json", False):
        return lambda *x, **k: print(*x, **{**k, "file": sys.stderr})
    return print


def _print_json(obj) -> None:
    """--json output: one JSON document on stdout (indented; keys in a stable order)."""
    print(json.dumps(obj, indent=1))


# ---- verbs ----------------------------------------------------------------------------------
def cmd_keygen(a):
    if a.aes:
        from . import payload
        kid = payload.generate_aes_key(Path(a.path), force=a.force)
        print(f"AES-256 key: {a.path} (mode 0600; a device secret: provision it with --aes-key, never commit it)")
        print(f"key id:      {kid}")
        return
    from . import keys
    kid = keys.generate(Path(a.path), force=a.force)
    print(f"private key: {a.path} (mode 0600; keep it secret, never commit it)")
    print(f"public key:  {a.path}.pub")
    print(f"key id:      {kid}")


def cmd_release(a):
    from . import keys, release
    from . import payload
    signers = [keys.load_private(Path(k)) for k in a.key]
    ids = [keys.keyid(k.public_key()) for k in signers]
    if len(set(ids)) < len(ids):
        raise MpotaError("the same key is given twice (--key)", hint="each --key adds one more signer")
    aes_key = payload.load_aes_key(Path(a.encrypt)) if a.encrypt else None
    print(f"release: reading {a.image}")
    if a.force:
        print("release: --force: not checking the board, the slot size, a `git describe` version or the "
              "version in the release directory")
    else:
        release.preflight(Path(a.image), Path(a.out), version=a.version, chip=a.chip, board=a.board)
    rel = release.build(Path(a.image), Path(a.out), signers, version=a.version, chip=a.chip,
                        board=a.board, security_counter=a.security_counter, compress=a.compress,
                        aes_key=aes_key, chunk=a.chunk, wbits=a.wbits)
    m = rel.manifest
    print(f"release: {m['version']} for board {m['board']} / chip {m['chip']}, "
          f"security counter {m['security_counter']}")
    p = m["payload"]
    how = ", ".join(x for x in (f"deflate wbits {p['wbits']}" if p["encoding"] == "deflate" else "",
                                f"AES-256-CBC key {p['encryption']['keyid']}" if "encryption" in p else "",
                                f"{len(p['chunks'])} chunks of {_human(p['chunk'])}" if "chunks" in p else "") if x)
    print(f"release: payload {p['url']} {_human(p['size'])} ({how or 'raw'}) for a "
          f"{_human(m['image']['size'])} image, sha256 {p['sha256'][:16]}...")
    print(f"release: signed by {', '.join(keys.keyid(k.public_key()) for k in signers)}")
    print(f"release: wrote {Path(a.out) / release.MANIFEST_NAME}")
    pubs = [k.public_key() for k in signers]
    release.verify(Path(a.out), pubs, aes_key)
    print("release: verified (signature, sizes, hashes, image)")


def cmd_verify(a):
    from . import keys, payload, release
    aes_key = payload.load_aes_key(Path(a.aes)) if a.aes else None
    trusted = [keys.load_public(Path(p)) for p in a.pub]
    try:
        rel = release.verify(Path(a.release), trusted, aes_key)
    except MpotaError as e:
        if a.json:  # the same failure, for scripts: stdout gets the JSON, stderr the message
            _print_json({"ok": False, "error": {"code": getattr(e, "code", None), "message": str(e), "hint": e.hint}})
        raise
    m = rel.manifest
    sealed = m["payload"].get("encryption") is not None and aes_key is None
    if a.json:
        ids = [keys.keyid(k) for k in trusted]
        env = json.loads((rel.path / release.MANIFEST_NAME).read_bytes())
        return _print_json({"ok": True, "version": m["version"], "board": m["board"], "chip": m["chip"],
                            "security_counter": m["security_counter"], "image": m["image"],
                            "payload": m["payload"], "image_checked": not sealed, "keyids": ids,
                            "signed_by": [s.get("keyid") for s in env["signatures"] if s.get("keyid") in ids]})
    print(f"OK: {m['version']} for {m['board']}/{m['chip']}, counter {m['security_counter']}, "
          f"payload {m['payload']['url']} {m['payload']['size']} bytes, signature and "
          + ("payload hashes verified (encrypted: the image inside is checked with --aes KEY)" if sealed
             else "hashes verified"))


def cmd_inspect(a):
    from . import inspection, keys, payload
    trusted = [keys.load_public(Path(p)) for p in a.pub or []]
    aes_key = payload.load_aes_key(Path(a.aes)) if a.aes else None
    rep = inspection.inspect(Path(a.file), trusted, aes_key)
    if a.json:
        return _print_json(rep)
    print("\n".join(inspection.describe(rep)))


def cmd_serve(a):
    from . import server as srv
    srv.check_release_dir(Path(a.release))

    def announce(server):
        host, port = server.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serve: {Path(a.release).resolve()} on http://{shown}:{port}/ (Ctrl-C stops); only the release "
              "files (signed documents and the payloads they name)", flush=True)
        for f in a.fault or []:
            print(f"serve: fault: {f.describe()}" + (f", {f.times} time(s)" if f.times < 1 << 30 else ""), flush=True)
        if host in ("0.0.0.0", "::"):
            urls = srv.urls_for(host, port)
            if urls:
                print(f"serve: devices use --server {urls[0]}" + (f" (or {', '.join(urls[1:])})" if urls[1:] else ""),
                      flush=True)
            else:
                print("serve: note: this machine has no address other machines can reach (no network?)", flush=True)

    if a.fault and a.access_log:
        raise MpotaError("--access-log is written by the plain server, not with --fault",
                         hint="drop one of them")
    try:
        if a.fault:
            from . import faultserver
            faultserver.serve(Path(a.release), a.fault, a.host, a.port, quiet=a.quiet,
                              announce=lambda fs: announce(fs.httpd))
        else:
            log = None
            if a.access_log:
                try:
                    log = open(a.access_log, "a", encoding="utf-8")
                except OSError as e:
                    raise MpotaError(f"cannot write the access log {a.access_log}: {e.strerror}") from None
            server = srv.make_server(Path(a.release), a.host, a.port, quiet=a.quiet, access_log=log)
            announce(server)
            if log:
                print(f"serve: access log (Combined Log Format) appended to {a.access_log}", flush=True)
            server.serve_forever()
    except KeyboardInterrupt:
        print("serve: stopped")


def cmd_boards(a):
    from . import BOARDS_DIR, partitions
    found = []
    for p in sorted(BOARDS_DIR.glob("*/board.json")):
        info = json.loads(p.read_text())
        slots = [q for q in partitions.parse_csv(p.parent / "partitions.csv") if q.is_ota_slot]
        found.append(dict(info, ota_slots=[{"label": q.label, "offset": q.offset, "size": q.size} for q in slots]))
        if a.json:
            continue
        print(f"{info['name']:8} chip {info['chip']:8} mpy {info['mpy_arch']:9} flash {info['flash_size']:4} "
              f"bootloader {info['bootloader_offset']:6} {len(slots)} x {_human(slots[0].size)} OTA slots  "
              f"{info.get('description', '')}")
    if a.json:
        _print_json(found)


def cmd_config(a):
    from . import deviceconfig
    from .sim.device import board_info
    info = board_info(a.board)
    ca = deviceconfig.load_ca(Path(a.ca)) if a.ca else None
    cfg = deviceconfig.make([Path(p) for p in a.pub], a.server, board=info.get("board_id", a.board),
                            chip=info["chip"], device_id=a.device_id, timeout_s=a.timeout,
                            mirrors=a.mirror or [], aes_keys=[Path(k) for k in a.aes_key or []], ca=ca,
                            rollout=_rollout_of(a))
    files = deviceconfig.write(Path(a.out), cfg, ca=ca)
    print(f"config: wrote {' and '.join(str(f) for f in files)} (board {cfg['board']}, chip {cfg['chip']}, "
          f"{len(cfg['pubkeys'])} key(s), server {cfg['server']})")
    if cfg.get("roles"):
        print(f"config: rollout role: {len(cfg['roles']['rollout']['keys'])} key(s); every install needs a "
              "rollout.json signed by one (docs/rollout.md)")
    if deviceconfig.holds_secrets(cfg):
        print(f"config: {files[0]} holds AES keys: mode 0600; never commit it or copy it anywhere but the device")
    copy = " + ".join(f"fs cp {f} :{'ota_config.json' if i == 0 else f.name}" for i, f in enumerate(files))
    print(f"config: next: mpota deploy --config {a.out} --port PORT, or by hand: mpremote {copy}")


def cmd_mpy(a):
    from . import BOARDS_DIR, devicepkg
    archs = a.arch or sorted({json.loads(p.read_text())["mpy_arch"] for p in BOARDS_DIR.glob("*/board.json")})
    for arch in archs:
        files = devicepkg.install_agent(Path(a.out) / arch, arch=arch)
        total = sum(f.stat().st_size for f in files)
        print(f"mpy: {arch:10} {len(files)} files, {total} bytes -> {Path(a.out) / arch / 'ota'}")


def cmd_sim_firmware(a):
    from . import espimage
    data = espimage.build_sim_firmware(a.version, a.behavior, a.size, a.chip, a.secure_version,
                                       a.min_chip_rev, a.max_chip_rev)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_bytes(data)
    print(f"firmware: {a.out} {a.version} ({a.behavior}, {a.chip}, secure_version {a.secure_version}), {_human(len(data))}")


def _fleet_entry(a, device_id: str, secret_file: Path | None) -> tuple[dict | None, Path | None]:
    """The fleet options checked: (ota_config.json's "fleet" entry, the file keeping its secret), or
    (None, None) without --fleet. With secret_file None the secret is made here, not kept (the
    caller keeps it). The admin token is read now, so that a bad one stops us before anything
    is made."""
    from . import fleetprov
    if not a.fleet:
        if a.fleet_secret or a.fleet_token_file:
            raise MpotaError("--fleet-secret and --fleet-token-file go with --fleet URL",
                             hint="add --fleet http://HOST:8470 (the fleet server the device reports to)")
        return None, None
    url = fleetprov.check_url(a.fleet)
    fleetprov.check_device_id(device_id)
    if a.fleet_token_file:
        fleetprov.read_token(Path(a.fleet_token_file))
    if secret_file is None:
        import secrets
        secret = secrets.token_hex(fleetprov.SECRET_BYTES)
    else:
        secret, _made = fleetprov.secret_at(secret_file)
    return fleetprov.config_entry(url, secret, interval_s=a.fleet_interval), secret_file


def _fleet_register(a, say, prefix: str, device_id: str, fleet: dict, secret_file: Path, board: str) -> None:
    """Register the device on the fleet server with --fleet-token-file, else say how to."""
    from . import fleetprov
    say(f"{prefix}: reports go to {fleet['url']}, signed with the secret in {secret_file} (mode 0600; "
        "never commit it)")
    if a.fleet_token_file:
        fleetprov.register(fleet["url"], Path(a.fleet_token_file), device_id, fleet["secret"], board=board,
                           interval_s=fleet["interval_s"], secret_file=secret_file)
        say(f"{prefix}: registered {device_id} on {fleet['url']}")
    else:
        say(f"{prefix}: next: register it on the fleet server: "
            + fleetprov.register_command(device_id, secret_file, fleet["url"]))


def cmd_sim_create(a):
    from .sim import device
    hw = {"chip_rev": a.chip_rev, "rollback": a.rollback, "board_confirms": a.board_confirms, "fs": a.fs,
          "erase64": a.erase64}
    secret_file = Path(a.fleet_secret) if a.fleet_secret else None
    fleet, _ = _fleet_entry(a, a.name, secret_file)
    dev = device.create(a.name, [Path(p) for p in a.pub], a.server, Path(a.firmware), root=Path(a.root),
                        heap=a.heap, source=a.source, force=a.force, mirrors=a.mirror or [],
                        aes_keys=[Path(k) for k in a.aes_key or []], ca=Path(a.ca) if a.ca else None,
                        hardware=hw, fleet=fleet, announce=a.announce, rollout=_rollout_of(a))
    quirks = [f"chip v{a.chip_rev // 100}.{a.chip_rev % 100}"]
    if a.rollback != "on":
        quirks.append("no app rollback in the bootloader" if a.rollback == "bootloader-off"
                      else "built without app rollback")
    if a.board_confirms:
        quirks.append("the board confirms every image at start-up")
    if a.fs != "host":
        quirks.append(f"{'LittleFS' if a.fs == 'littlefs' else 'FAT'} filesystem in the flash")
    if a.erase64:
        quirks.append("a firmware that erases 64 KiB blocks")
    print(f"sim: created {dev.path}/ (board {dev.board}, heap {dev.heap}, {', '.join(quirks)})")
    print(f"sim: flash {dev.flash} with {Path(a.firmware).name} in ota_0; agent in {dev.fs}/lib/ota "
          f"({'.py sources' if a.source else '.mpy'})")
    print(f"sim: server {a.server}" + (f" (checked against {a.ca}, provisioned as ca.der)" if a.ca else "")
          + (" (the device names itself in its manifest fetches: --announce)" if a.announce else "")
          + f"; next: mpota sim run {a.name}")
    if a.rollout_pub:
        print(f"sim: rollout role: {len(a.rollout_pub)} key(s); every install needs a rollout.json signed by one"
              + (", judged at the time NTP gives it (`sim run --net-time`)" if a.ntp else ", and the board has no "
                 "clock at power-on (--ntp HOST gives it one)") + " (docs/rollout.md)")
    if fleet:
        try:
            _fleet_register(a, print, "sim", a.name, fleet, secret_file or dev.path / device.FLEET_SECRET,
                            device.board_info(dev.board).get("board_id", dev.board))
        except MpotaError as e:
            raise MpotaError(f"created {dev.path}/, but {e}", hint=e.hint) from None


def cmd_sim_run(a):
    from .sim import device, runner, summary
    if a.tear and a.cut_at is None:
        raise MpotaError("--tear needs --cut-at N", hint="e.g. mpota sim run dev1 --cut-at 40 --tear")
    echo = (lambda line: print(line, file=sys.stderr, flush=True)) if a.json else print
    with device.opened(a.name, Path(a.root), "mpota sim run") as dev:
        ops = dev.path / "flash-ops"  # the emulated flash counts its operations here
        cut = runner.PowerCut(a.cut_at, a.tear, ops_file=ops.resolve())
        t0 = time.monotonic()
        try:
            boots = runner.run(dev, heap=a.heap, max_boots=a.max_boots, hang_s=a.hang_after, cut=cut, echo=echo,
                               net_time=a.net_time)
        finally:
            ops.unlink(missing_ok=True)
        seconds = time.monotonic() - t0
        status = runner.status(dev) if boots[-1].exit == "idle" else None
    s = summary.summarize(a.name, boots, seconds, status, cut, a.expect_version)
    if a.json:
        _print_json(s)
    else:
        print("\n".join(summary.describe(s)))
    return 0 if s["ok"] else 1


STATUS_ORDER = ("version", "slot", "slots", "last_result", "last_error", "detail", "pending",
                "progress", "rejected", "retry_after", "security_floor", "secure_version", "rollback")


def cmd_sim_status(a):
    from .sim import device, runner
    with device.opened(a.name, Path(a.root), "mpota sim status") as dev:
        st = runner.status(dev)
    ordered = {k: st[k] for k in STATUS_ORDER if k in st}
    ordered.update(st)
    print(json.dumps(ordered, indent=1))


def cmd_sim_list(a):
    from .sim import device, runner
    rows = []
    for dev in device.list_devices(Path(a.root)):
        st = runner.read_state(dev) or {}
        rows.append({"name": dev.name, "version": dev.running.get("version"), "slot": dev.running.get("slot"),
                     "last_result": st.get("last_result") if isinstance(st, dict) else None,
                     "last_error": st.get("last_error") if isinstance(st, dict) else None,
                     "path": str(dev.path.resolve())})
    if a.json:
        return _print_json(rows)
    if not rows:
        print(f"sim: no simulated devices in {Path(a.root).resolve()}/ (--root {a.root})")
        return
    print(f"{'NAME':16} {'VERSION':12} {'SLOT':6} LAST RESULT")
    for r in rows:
        result = (r["last_result"] or "-") + (f" ({r['last_error']})" if r["last_error"] else "")
        print(f"{r['name']:16} {r['version'] or '(never run)':12} {r['slot'] or '-':6} {result}")


def cmd_sim_delete(a):
    from .sim import device
    path = device.delete(a.name, Path(a.root))
    print(f"sim: deleted {path.resolve()}/")


def _find_port(a, what: str) -> None:
    """--port not given: the one likely board attached (esptool's and mpremote's way)."""
    from . import serialports
    a.port, why = serialports.choose_port(also=f"; --dry-run {'checks' if what == 'flash' else 'stages'} "
                                               "everything without a board")
    print(f"{what}: port {a.port} ({why}; --port chooses another)", file=sys.stderr if getattr(a, "json", False)
          else sys.stdout, flush=True)


def cmd_flash(a):
    from . import flashing
    p = flashing.plan(a.board, Path(a.firmware), Path(a.bootloader) if a.bootloader else None)
    if a.erase_all:
        flashing.check_complete(p, "--erase-all")
    if not a.port and not a.dry_run and not a.merged:
        _find_port(a, "flash")
    kind = "merged image (bootloader + partition table + app)" if p.kind == "merged" else "app image"
    print(f"flash: {a.firmware}: {kind} for {p.app.chip}, version {p.app.version or '(none in esp_app_desc_t)'}")
    for r in p.regions:
        print(f"flash:   0x{r.offset:06x}  {len(r.data):>8} bytes  {r.what}")
    for note in p.notes:
        print(f"flash: note: {note}")
    out = Path(a.out or f"build/flash/{a.board}")
    files = flashing.write_files(p, out)
    cmd = flashing.esptool_command(p, files, a.port, a.baud, a.erase_all)
    print(f"flash: wrote {out}/ ({', '.join(f.name for _, f in files)}, {flashing.FLASH_ARGS_NAME})")
    if a.merged:
        image = flashing.merged_image(p)
        Path(a.merged).parent.mkdir(parents=True, exist_ok=True)
        Path(a.merged).write_bytes(image)
        print(f"flash: wrote {a.merged} ({_human(len(image))}: bootloader, partition table, otadata, app) "
              f"for an erased chip, written at 0x0: esptool --chip {p.chip} write-flash 0x0 {a.merged}")
        return
    if a.dry_run:
        print("flash: dry run, nothing written to a board; the esptool command that writes the same:")
        print(flashing.shell_line(cmd))
        return
    print(f"flash: writing through esptool's Python API, as: {flashing.shell_line(cmd)}", flush=True)
    t0 = time.monotonic()
    flashing.flash(p, a.port, a.baud, erase_all=a.erase_all, no_progress=a.no_progress)
    slot = next(q for q in p.table if q.is_ota_slot)
    print(f"flash: done in {time.monotonic() - t0:.1f} s; the board boots MicroPython from {slot.label}")
    print(f"flash: next: mpota deploy --port {a.port} --pub keys/release.pub --server http://YOUR-HOST:8000")


def cmd_deploy(a):
    import os
    from . import deploy, deviceconfig
    from .sim.device import board_info
    say = _say(a)
    if a.config and (a.pub or a.server or a.ca):
        raise MpotaError("give either --config FILE or --pub/--server (and --ca), not both",
                         hint="a config written by `mpota config --ca` names its CA file already")
    if not a.config and not (a.pub and a.server):
        raise MpotaError("the device needs a release server and a trusted key",
                         hint="give --pub keys/release.pub --server http://HOST:8000 (or --config ota_config.json)")
    t0 = time.monotonic()
    pr = None
    if a.dry_run:
        board = a.board or "esp32"
        board_info(board)
        a.port = a.port or "PORT"
    else:
        if not a.port:
            _find_port(a, "deploy")
        say(f"deploy: asking the board on {a.port} what it runs ...", flush=True)
        pr = deploy.probe(a.port)
        board = deploy.choose_board(pr, a.board, a.source)
        say(f"deploy: {pr.describe()}: board {board}" + (f", unique id {pr.uid}" if pr.uid else ""))
    info = board_info(board)
    if a.config:
        cfg, ca = deploy.load_config(Path(a.config))
        if cfg.get("chip", info["chip"]) != info["chip"]:
            raise MpotaError(f"{a.config} is for chip {cfg.get('chip')}; board {board} is {info['chip']}",
                             hint=f"write it with: mpota config --board {board} ...")
    else:
        device_id = a.device_id if a.device_id is not None else (pr.uid if pr else "")
        ca = deviceconfig.load_ca(Path(a.ca)) if a.ca else None
        cfg = deviceconfig.make([Path(k) for k in a.pub], a.server, board=info.get("board_id", board),
                                chip=info["chip"], device_id=device_id, timeout_s=a.timeout,
                                mirrors=a.mirror or [], aes_keys=[Path(k) for k in a.aes_key or []], ca=ca,
                                announce=a.announce)
    rollout = _rollout_of(a)
    if rollout:
        deviceconfig.add_rollout(cfg, rollout)
    fleet_id = cfg.get("device_id") or (pr.uid if pr else "")
    if a.fleet and not fleet_id:
        raise MpotaError("--fleet needs the device's id, and a dry run does not ask the board",
                         hint="give --device-id (the board's machine.unique_id() in hex, or a name of yours)")
    secret_file = Path(a.fleet_secret or f"keys/fleet/{fleet_id}.secret") if a.fleet else None
    fleet, _ = _fleet_entry(a, fleet_id, secret_file)
    if fleet:
        if fleet["url"].startswith("https://") and not cfg.get("ca"):
            raise MpotaError(f"the fleet server {fleet['url']} is https: the device needs the CA certificate",
                             hint="add --ca ca.pem (the CA that signed the release and fleet servers' certificates)")
        cfg["fleet"] = fleet
        cfg["device_id"] = fleet_id
    if a.announce:
        cfg["announce"] = True
    if a.no_main:
        main, main_note = None, "main.py: left as it is (--no-main)"
    elif a.main:
        main, main_note = Path(a.main), f"main.py: {a.main}"
    elif pr is not None and pr.main:
        main, main_note = None, (f"main.py: the board has one, kept (it must call ota.confirm() first; "
                                 f"example: {deploy.example_main(board)}; --main FILE replaces it)")
    else:
        main = deploy.example_main(board)
        main_note = f"main.py: the example {main}"
    wifi = None
    if a.wifi:
        wifi = (a.wifi, os.environ.get("MPOTA_WIFI_PASSWORD", ""))
        if not wifi[1]:
            say(f"deploy: note: MPOTA_WIFI_PASSWORD is not set: {a.wifi} is joined as an open network")
    frozen = pr.frozen if pr is not None else ""
    if frozen:
        say(f"deploy: the agent is frozen into the board's firmware ({frozen}): it runs from flash; no agent "
            "file is copied, and lib/ota, which it shadows, is emptied")
    st = deploy.stage(Path(a.stage or f"build/deploy/{board}"), board, cfg, main=main, wifi=wifi,
                      source=a.source, ca=ca, frozen=bool(frozen))
    agent_note = "lib/ota: none (frozen agent)" if frozen else (
        f"lib/ota ({len(st.agent)} files, {'.py sources' if a.source else '.mpy for ' + info['mpy_arch']})")
    say(f"deploy: staged in {st.dir}/: {agent_note}, ota_config.json "
        f"(server {cfg['server']}, {len(cfg['pubkeys'])} key(s), device id {cfg.get('device_id') or '-'})"
        + (f", {cfg['ca']} (CA for https)" if ca else "") + (", wifi.json" if wifi else ""))
    say(f"deploy: {main_note}")
    args = deploy.copy_args(a.port, st, status=a.status, reset=a.reset)
    if a.dry_run:
        say("deploy: dry run, nothing sent to a board; the mpremote command that copies it:")
        say(deploy.shell_line(args))
        if fleet:
            from . import fleetprov
            say(f"deploy: reports go to {fleet['url']}, signed with the secret in {secret_file} (mode 0600; "
                "never commit it); once copied, register the device: "
                + fleetprov.register_command(fleet_id, secret_file, fleet["url"]))
        if a.json:
            _print_json({"port": a.port, "board": board, "staged": str(st.dir), "dry_run": True,
                         "command": ["mpremote", *args]})
        return
    total = len(st.agent) + len(st.root_files)
    say(f"deploy: copying {total} files ({_human(st.size)}) with mpremote ...", flush=True)
    status, out = deploy.copy(a.port, st, status=a.status, reset=a.reset,
                              echo=lambda line: say("    | " + line, flush=True))
    same = out.count("Up to date:")
    if wifi:
        (st.dir / "wifi.json").unlink()
    say(f"deploy: done in {time.monotonic() - t0:.1f} s: {total} files, {total - same} copied, "
        f"{same} already up to date")
    if status is not None:
        ordered = {k: status[k] for k in STATUS_ORDER if k in status}
        ordered.update(status)
        say("deploy: ota.status() on the board:")
        say(json.dumps(ordered, indent=1))
    warning = deploy.rollback_warning(pr, status)
    if warning:
        say(f"deploy: warning: {warning}")
    if fleet:
        _fleet_register(a, say, "deploy", fleet_id, fleet, secret_file, cfg.get("board") or board)
    if a.json:
        _print_json({"port": a.port, "board": board, "staged": str(st.dir), "frozen_agent": frozen or None,
                     "files": total,
                     "copied": total - same, "up_to_date": same, "reset": a.reset,
                     "status": ordered if status is not None else None, "warning": warning})
    if a.reset:
        say(f"deploy: the board was told to reset, so that main.py runs; watch it: mpremote connect {a.port} repl")
    else:
        say(f"deploy: next: reset the board so main.py runs (mpremote connect {a.port} reset, or --reset)")


def cmd_push(a):
    from . import push
    print(f"push: {a.release} to the board on {a.port}: its agent fetches the release from us over the "
          f"serial link and verifies it as over HTTP", flush=True)
    done = push.push(Path(a.release), a.port, a.baud, a.timeout, reset=a.reset,
                     echo=lambda line: print("    | " + line, flush=True))
    r = done.result
    rate = done.sent / done.seconds / 1024 if done.seconds else 0
    print(f"push: {_human(done.sent)} sent in {done.seconds:.1f} s ({rate:.1f} KiB/s); the board's "
          f"ota.update(): {r.get('result')}" + (f", {r['error']}" if r.get("error") else "")
          + (f" ({r['detail']})" if r.get("detail") else ""))
    if r.get("result") != "installed":
        return 1
    if a.reset:
        print("push: the board was told to reset: the new firmware boots, confirms itself or rolls back")
    else:
        print(f"push: next: reset the board (mpremote connect {a.port} reset, or --reset) so that the new firmware boots")
    return 0


def cmd_sim_repl(a):
    from .sim import device, repl
    dev = device.load(a.name, Path(a.root))
    srv = repl.listen(a.host, a.port)
    host, port = srv.getsockname()[:2]
    url = f"socket://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"sim repl: {a.name}'s MicroPython REPL on {url} (Ctrl-C stops)", flush=True)
    print(f"sim repl: try: mpremote connect {url} resume fs ls   or   mpota deploy --port {url} ...", flush=True)
    try:
        repl.serve(dev, srv, heap=a.heap, once=a.once, log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        print("sim repl: stopped")
    finally:
        srv.close()


def _names_arg(values) -> list[str]:
    """--boards a,b --boards c -> [a, b, c]."""
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


def cmd_rollout_sign(a):
    from . import keys, rollout
    key = keys.load_private(Path(a.key))
    window = None
    if a.window is not None:
        window = rollout.make_window(a.window, a.window_duration, a.utc_offset, a.jitter)
    elif a.window_duration is not None or a.jitter or a.utc_offset:
        raise MpotaError("--window-duration, --utc-offset and --jitter go with --window CRON",
                         hint='e.g. --window "0 2 * * *" --window-duration 2h --utc-offset +01:00 --jitter 15m')
    targets = {k: v for k, v in (("boards", _names_arg(a.boards)), ("groups", _names_arg(a.groups)),
                                 ("devices", _names_arg(a.devices))) if v}
    now = int(time.time())
    s = rollout.sign(Path(a.release), key, now=now, stages=a.stages, share=a.share, valid_for=a.valid_for,
                     expires=a.expires, halted=a.halt, targets=targets, exclude=_names_arg(a.exclude),
                     window=window, rollout_id=a.rollout_id)
    for line in rollout.describe(s.doc, now):
        print(f"rollout: {line}")
    print(f"rollout: issued {rollout.iso(s.doc['issued'])}"
          + (f" (previous document: {rollout.iso(s.previous_issued)})" if s.previous_issued is not None
             else " (first document here)"))
    for note in s.notes:
        print(f"rollout: note: {note}")
    print(f"rollout: signed by {s.keyid}; wrote {s.path} ({len(s.envelope)} bytes, at most "
          f"{rollout.rolloutdoc.MAX_BYTES})")
    print(f"rollout: verified (read back: signature by the rollout key, names {Path(a.release) / 'manifest.json'})")


def cmd_rollout_show(a):
    from . import keys, rollout
    trusted = [keys.load_public(Path(p)) for p in a.pub or []]
    now = int(time.time())
    at = now
    if a.at is not None:
        try:
            at = rollout.parse_time(a.at, now)
        except ValueError as e:
            raise MpotaError(f"--at: {e}", hint=f"give {rollout.TIME_FORMS}") from None
    if (a.board or a.group) and a.device is None:
        raise MpotaError("--board and --group describe the device given with --device ID",
                         hint="e.g. --device dev-17 --board esp32 --group canary")
    sh = rollout.show(a.source, trusted, now=at, device=a.device, board=a.board, groups=_names_arg(a.group),
                      timeout=a.timeout)
    if a.json:
        return _print_json({"source": sh.where, "verified": sh.verified, "release_matches": sh.release_matches,
                            "at": at, "share_bp_now": sh.share_bp_now, "document": sh.doc, "device": sh.device})
    print(f"rollout: {sh.where}")
    for line in rollout.describe(sh.doc, at):
        print(f"rollout: {line}")
    if sh.release_matches is None:
        print("rollout: no manifest.json beside it: which release it names is not checked")
    elif sh.release_matches:
        print(f"rollout: names the manifest.json beside it ({(sh.manifest or {}).get('version')})")
    else:
        print("rollout: names ANOTHER release than the manifest.json beside it: devices hold back "
              "(rollout-other-release) until it is re-signed")
    if sh.verified:
        print(f"rollout: verified: signed by a rollout key ({', '.join(keys.keyid(k) for k in trusted)})")
    else:
        print("rollout: signature NOT checked (give --pub keys/rollout.pub)")
    d = sh.device
    if d:
        print(f"rollout: device {d['id']} (board {d['board'] or '-'}, groups {', '.join(d['groups']) or '-'}) at "
              f"{rollout.iso(d['at'])}: bucket {d['bucket']} (in any share above {d['bucket_share_bp'] / 100:.2f} %), "
              + ("in" if d["in_share"] else "not in") + f" the share in force ({sh.share_bp_now / 100:g} %)"
              + (f", window opens {d['jitter_s']} s late (jitter)" if sh.doc.get("window") else ""))
        print(f"rollout: device {d['id']}: " + ("installs now" if d["installs"] else f"holds back: {d['decision']}"))


def cmd_mirror_sync(a):
    from . import keys, mirror
    release_keys = [keys.load_public(Path(p)) for p in a.pub]
    rollout_keys = [keys.load_public(Path(p)) for p in a.rollout_pub or []]
    dest = Path(a.dir)
    if a.every is not None:
        print(f"mirror: {a.upstream} -> {dest.resolve()} every {a.every} s (Ctrl-C stops); serve it with: "
              f"mpota serve {a.dir}", flush=True)
        try:
            mirror.run(a.upstream, dest, release_keys, rollout_keys, every=a.every, timeout=a.timeout,
                       allow_older=a.allow_older, say=lambda line: print(line, flush=True))
        except KeyboardInterrupt:
            print("mirror: stopped")
        return 0
    print(f"mirror: {a.upstream} -> {dest.resolve()}", flush=True)
    res = mirror.sync(a.upstream, dest, release_keys, rollout_keys, timeout=a.timeout, allow_older=a.allow_older)
    print(f"mirror: {mirror.describe(res)}")
    for note in res.notes:
        print(f"mirror: note: {note}")
    from . import release
    release.verify(dest, release_keys)
    if res.rollout is not None:
        from . import rolloutdoc
        rolloutdoc.open_document((dest / "rollout.json").read_bytes(), rollout_keys)
    print("mirror: verified the copy (manifest signature, payload size and hash"
          + (", rollout.json signature" if res.rollout is not None else "") + f"); serve it with: mpota serve {a.dir}")


# ---- parser ---------------------------------------------------------------------------------
def _bounded(what: str, lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = lo - 1
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{text!r}: give {what} from {lo} to {hi}")
        return n
    return parse


def _fleet_args(s, secret_default):
    g = s.add_argument_group("fleet (docs/fleet.md)")
    g.add_argument("--fleet", metavar="URL", help="fleet server the device sends its reports to, e.g. "
                                                  "http://192.168.1.10:8470 (a secret is made for it)")
    g.add_argument("--fleet-secret", metavar="FILE", help="the device's report secret (hex, mode 0600): made "
                                                          f"if missing, kept if there (default {secret_default})")
    g.add_argument("--fleet-token-file", metavar="FILE",
                   help="the fleet server's admin token: register the device there at once "
                        "(otherwise the `mpota fleet register` command to run is printed)")
    g.add_argument("--fleet-interval", type=_bounded("seconds", 10, 30 * 86400), default=3600,
                   metavar="SECONDS", help="how often the device checks for updates, for the server's "
                                           "'silent' alarm (default 3600)")
    g.add_argument("--announce", action="store_true",
                   help="name the device in its manifest fetches (User-Agent and query string), for "
                        "fleet inventory from a release server's logs")


def _rollout_args(s):
    g = s.add_argument_group("rollouts (docs/rollout.md)")
    g.add_argument("--rollout-pub", action="append", metavar="FILE",
                   help="public key of the rollout role (repeatable): the device then installs a release only "
                        "as the rollout.json beside it, signed by this key, allows (a release key cannot sign "
                        "one, nor this key a release)")
    g.add_argument("--group", action="append", metavar="NAME",
                   help="a group the device belongs to, for a rollout's targets (repeatable, at most 8)")
    g.add_argument("--ntp", metavar="HOST", help="NTP server the device sets its clock from before judging a "
                                                 "rollout (e.g. pool.ntp.org)")
    g.add_argument("--window", metavar="CRON,DURATION_S[,UTC_OFFSET_MIN[,JITTER_S]]",
                   help="the device's own maintenance window, e.g. \"0 2 * * *,7200\" (02:00-04:00 UTC every "
                        "day); a rollout's window applies as well")


def _rollout_of(a) -> dict:
    from . import deviceconfig
    window = deviceconfig.parse_window(a.window) if a.window else None
    return deviceconfig.rollout_settings([Path(p) for p in a.rollout_pub or []], a.group or [], a.ntp, window)


def _fault(text: str):
    from .faultserver import parse_fault
    try:
        return parse_fault(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _fault_switches() -> dict:
    from .faultserver import SWITCHES
    return SWITCHES


def _duration(text: str) -> int:
    from .rollout import parse_duration
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _utc_offset(text: str) -> int:
    from .rollout import parse_utc_offset
    try:
        return parse_utc_offset(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _rollout_time_forms() -> str:
    from .rollout import TIME_FORMS
    return TIME_FORMS

def _net_time(text: str) -> str:
    from .sim.runner import net_time_offset
    try:
        net_time_offset(text)
    except MpotaError as e:
        raise argparse.ArgumentTypeError(f"{e}; {e.hint}") from None
    return text


_timeout = _bounded("seconds", 1, 300)
_baud = _bounded("a baud rate", 9600, 5000000)
_tcp_port = _bounded("a TCP port", 0, 65535)


class _Parser(argparse.ArgumentParser):
    """argparse, with a hint after its errors: what to type when no command is given, and the
    closest command or choice to a mistyped one (difflib), as git and pip do."""

    def error(self, message):
        self.print_usage(sys.stderr)
        hint = f"`{self.prog} --help` lists the commands and options"
        m = re.search(r"invalid choice: '?([^'\s]*)'?", message)
        if m:
            choices = [c for a in self._actions if a.choices for c in a.choices if isinstance(c, str)]
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]!r}?"
        elif "required: COMMAND" in message:
            example = {"mpota sim": "`mpota sim list`", "mpota fleet": "`mpota fleet devices --db fleet.sqlite`",
                       "mpota rollout": "`mpota rollout show release/`",
                       "mpota mirror": "`mpota mirror sync URL mirror/ --pub keys/release.pub`"}.get(
                self.prog, "`mpota boards` or `mpota sim list`")
            hint = f"give a command, e.g. {example}; `{self.prog} --help` lists them"
        sys.stderr.write(f"{self.prog}: error: {message}\n  hint: {hint}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpota", description="Secure OTA updates for MicroPython devices.")
    p.add_argument("--version", action="version", version=f"mpota {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND", required=True)

    s = sub.add_parser("keygen", help="make an Ed25519 key pair: release key, rollout key (or an AES payload key: --aes)",
                       description="Write PATH (private, PEM, mode 0600) and PATH.pub; print the key id. "
                                   "One key per role: `mpota keygen keys/release` signs releases (kept offline), "
                                   "`mpota keygen keys/rollout` signs rollout documents (`mpota rollout sign`, "
                                   "the fleet server); devices trust each for its role only (docs/rollout.md). "
                                   "With --aes, write an AES-256 payload-encryption key instead.")
    s.add_argument("path", help="private key file to create, e.g. keys/release or keys/rollout")
    s.add_argument("--aes", action="store_true",
                   help="make an AES-256 payload-encryption key (hex, mode 0600) instead")
    s.add_argument("--force", action="store_true", help="replace existing key files")
    s.set_defaults(func=cmd_keygen)

    s = sub.add_parser("release", help="sign a firmware image into a release directory",
                       description="Read version and chip from the image, write OUT/manifest.json "
                                   "(DSSE envelope) and the payload, then verify the result.")
    s.add_argument("image", help="ESP app image (.bin)")
    s.add_argument("--key", action="append", required=True, help="private key (repeat to add signatures)")
    s.add_argument("--out", required=True, help="release directory to write")
    s.add_argument("--version", help="override the version (must match the image's esp_app_desc_t)")
    s.add_argument("--chip", help="override the chip (must match the image header)")
    s.add_argument("--board", help="board id devices must have (default: the chip name)")
    s.add_argument("--security-counter", type=_counter,
                   help="anti-rollback counter (default: the image's secure_version)")
    s.add_argument("--compress", action="store_true", help="raw-deflate the payload in resumable chunks")
    s.add_argument("--wbits", type=int, default=10, choices=range(9, 16), metavar="9..15",
                   help="deflate window: the device needs 2**wbits bytes of RAM to inflate (default 10)")
    s.add_argument("--chunk", type=_size, default=64 * 1024,
                   help="image bytes per chunk of a compressed/encrypted payload (multiple of 4K, default 64K)")
    s.add_argument("--encrypt", metavar="KEYFILE", help="AES-256 key file (mpota keygen --aes) to encrypt the payload")
    s.add_argument("--force", action="store_true",
                   help="sign even what devices would refuse or ignore: a board no definition has, a board "
                        "of another chip, an image larger than the board's OTA slot, a version not newer "
                        "than the one OUT holds, a `git describe` version (v1.2.3-4-gHASH, -dirty)")
    s.set_defaults(func=cmd_release)

    s = sub.add_parser("verify", help="check a release: signature, sizes, hashes, image",
                       description="Exit 0 if the release verifies with one of the keys; otherwise "
                                   "exit 2 with the reason.")
    s.add_argument("release", help="release directory (or its manifest.json)")
    s.add_argument("--pub", action="append", required=True, help="trusted public key (repeatable)")
    s.add_argument("--aes", metavar="KEYFILE", help="AES key, to check the image inside an encrypted payload")
    s.add_argument("--json", action="store_true", help='the result as JSON: {"ok": true, "version", ...} or '
                                                       '{"ok": false, "error": {"code", "message", "hint"}}')
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("inspect", help="show what a firmware image, manifest or release says about itself",
                       description="Like `esptool image-info` and imgtool's dumpinfo. FILE is an ESP app "
                                   "image (chip, version, secure_version, project, chip revisions, segments, "
                                   "sizes, SHA-256, checksum and hash validity), a merged flash image "
                                   "(bootloader, partition table, app), a manifest.json or a release "
                                   "directory (version, board, chip, counter, payload, encoding, chunks, sizes, "
                                   "hashes, key ids; with --pub whether each signature is valid and whether "
                                   "the release verifies). Exit 0 whenever FILE could be read: problems are "
                                   "listed, not judged (`mpota verify` is the gate).")
    s.add_argument("file", metavar="FILE", help="firmware .bin, manifest.json or release directory")
    s.add_argument("--pub", action="append", help="trusted public key: check signatures (repeatable)")
    s.add_argument("--aes", metavar="KEYFILE", help="AES key, to check the image inside an encrypted payload")
    s.add_argument("--json", action="store_true", help="the report as JSON")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("serve", help="serve a release directory over HTTP (HEAD, Range, ETag)",
                       description="Serve the release in DIR: manifest.json, the other signed documents "
                                   "(DSSE envelopes) and the payload files they name; 404 for anything "
                                   "else. A directory without manifest.json, or with private keys in it, "
                                   "is refused.")
    s.add_argument("release", metavar="DIR", help="release directory to serve (made by `mpota release --out`)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 or :: "
                                                       "for boards on the network: the addresses to give "
                                                       "them are printed)")
    s.add_argument("--port", type=_tcp_port, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--quiet", action="store_true", help="no request log")
    s.add_argument("--access-log", metavar="FILE",
                   help="append every request to FILE in the Combined Log Format (with the query string and "
                        "User-Agent devices announce themselves with: `mpota fleet import-logs`)")
    s.add_argument("--fault", action="append", type=_fault, metavar="FAULT[,path=SUFFIX][,times=N]",
                   help="misbehave, for QA (repeatable; the first that matches a request applies): "
                        + "; ".join(f"{k}{'' if p is None else '=N' if k != 'trickle' else '=SECONDS'}: {h}"
                                    for k, (_a, p, h) in _fault_switches().items())
                        + ". path=SUFFIX: only requests whose path ends so; times=N: only the first N; "
                          "retry-after=S: a Retry-After header with status=")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("rollout", help="sign or show a release's rollout.json: who installs it when (docs/rollout.md)",
                       description="The rollout document beside a release's manifest.json, signed by the "
                                   "rollout key (`mpota keygen keys/rollout`; never the release key), for static "
                                   "hosting without a fleet server: stages, halt, targets, maintenance window.")
    rsub = s.add_subparsers(dest="rolloutverb", metavar="COMMAND", required=True)
    s = rsub.add_parser("sign", help="write RELEASE_DIR/rollout.json (signed, atomically) and verify it",
                        description="Sign the rollout of the release in RELEASE_DIR (its manifest.json names it "
                                    "by SHA-256) with the rollout key, write RELEASE_DIR/rollout.json atomically, "
                                    "print a summary and verify what was written. Re-sign to advance, pause or "
                                    "halt: `issued` stays strictly increasing (one second after the previous "
                                    "document's, if that is later than now). Times: " + _rollout_time_forms()
                                    + "; relative times count from now.")
    s.add_argument("release", metavar="RELEASE_DIR", help="release directory (mpota release --out)")
    s.add_argument("--key", required=True, help="the rollout private key (make it with `mpota keygen keys/rollout`; "
                                                "the release key is refused)")
    g = s.add_argument_group("who may install when (one of --share, --stages; --halt alone is share 0)")
    g.add_argument("--share", metavar="PERCENT", help="this share of the devices from now on, e.g. 10 or 0.5")
    g.add_argument("--stages", metavar="P@WHEN,...", help='shares over time, e.g. "1@2026-12-01T00:00Z,10@+1d,100@+3d"')
    g.add_argument("--halt", metavar="REASON", help="halt the rollout: no device installs (at most 160 characters)")
    g.add_argument("--boards", action="append", metavar="B,..", help="only devices of these boards (repeatable)")
    g.add_argument("--groups", action="append", metavar="G,..", help="only devices in these groups, or --devices")
    g.add_argument("--devices", action="append", metavar="ID,..", help="only these devices, or --groups")
    g.add_argument("--exclude", action="append", metavar="ID,..", help="devices that may not install (penalty box)")
    g = s.add_argument_group("expiry (devices refuse an expired document: re-sign before it expires)")
    e = g.add_mutually_exclusive_group()
    e.add_argument("--expires", metavar="WHEN", help="a duration after issued (7d, 36h) or a time "
                                                     "(2026-12-31T00:00Z); default 7d")
    e.add_argument("--valid-for", type=_duration, metavar="DURATION", help="the same as --expires DURATION")
    g = s.add_argument_group("maintenance window (installs only while it is open; devices need a set clock)")
    g.add_argument("--window", metavar="CRON", help='when it opens: "M H DOM MON DOW", e.g. "0 2 * * *"')
    g.add_argument("--window-duration", type=_duration, metavar="DURATION", help="how long it stays open, e.g. 2h")
    g.add_argument("--utc-offset", type=_utc_offset, default=0, metavar="+HH:MM",
                   help="the cron's local time as a fixed offset from UTC (default +00:00)")
    g.add_argument("--jitter", type=_duration, default=0, metavar="DURATION",
                   help="each device opens the window up to this much later (default 0), e.g. 15m")
    s.add_argument("--rollout-id", metavar="ID", help="the rollout's name (default: the previous document's for "
                                                      "the same release, else r-YYYYMMDD-<release digest>)")
    s.set_defaults(func=cmd_rollout_sign)

    s = rsub.add_parser("show", help="print a rollout.json, verify it, and say what one device would do",
                        description="Print the rollout document of a release directory or a release URL "
                                    "(http/https), verify it with --pub, check it names the manifest.json beside "
                                    "it, and with --device ID what that device would do (its bucket, the share "
                                    "in force, targets, window: the device's rules, as with a set clock).")
    s.add_argument("source", metavar="RELEASE_DIR|URL", help="release directory, rollout.json, or release URL")
    s.add_argument("--pub", action="append", help="the rollout public key (keys/rollout.pub): verify the signature")
    s.add_argument("--device", metavar="ID", help="what this device would do")
    s.add_argument("--board", help="the device's board (default: the manifest's)")
    s.add_argument("--group", action="append", metavar="G", help="a group the device is in (repeatable)")
    s.add_argument("--at", metavar="WHEN", help="judge at this time instead of now (" + _rollout_time_forms() + ")")
    s.add_argument("--timeout", type=_timeout, default=30, metavar="SECONDS", help="for a URL (default 30)")
    s.add_argument("--json", action="store_true", help='{"source", "verified", "release_matches", "at", '
                                                       '"share_bp_now", "document", "device": {...} | null}')
    s.set_defaults(func=cmd_rollout_show)

    s = sub.add_parser("mirror", help="an edge mirror of a release: sync it from upstream, checked (no keys held)",
                       description="Edge mirrors (a gateway in a plant or on a ship) copy a release and its "
                                   "rollout.json from upstream, verified, for `mpota serve DIR`.")
    msub = s.add_subparsers(dest="mirrorverb", metavar="COMMAND", required=True)
    s = msub.add_parser("sync", help="copy a release (and its rollout.json) from UPSTREAM into DIR, verified",
                        description="Fetch UPSTREAM/manifest.json and verify it with the release key, fetch the "
                                    "payload it names (bounded by its signed size; size and SHA-256 checked), "
                                    "fetch rollout.json if there is one and verify it with the rollout key "
                                    "(one older than any the mirror published is refused as a replay, even after a 404; "
                                    "so is an older release, unless --allow-older), then publish into "
                                    "DIR by renames: payload, manifest.json, rollout.json; the payload no longer "
                                    "named is removed. A refused or failed sync changes nothing. Unchanged files "
                                    "are not downloaded again. Serve DIR with `mpota serve DIR`.")
    s.add_argument("upstream", metavar="UPSTREAM", help="the release directory's URL, e.g. https://updates.example.com/esp32/")
    s.add_argument("dir", metavar="DIR", help="the mirror directory (created if missing)")
    s.add_argument("--pub", action="append", required=True, help="the release public key (repeatable)")
    s.add_argument("--rollout-pub", action="append", help="the rollout public key (needed when upstream has a "
                                                          "rollout.json; repeatable)")
    s.add_argument("--every", type=_bounded("seconds", 10, 7 * 86400), metavar="SECONDS",
                   help="keep syncing every SECONDS, one line per sync; an upstream outage keeps the last good copy "
                        "and backs off (to at most 15 min, or SECONDS if longer)")
    s.add_argument("--timeout", type=_timeout, default=30, metavar="SECONDS",
                   help="network timeout per request (default 30)")
    s.add_argument("--allow-older", action="store_true",
                   help="follow an upstream that went back to an older release than the mirror published (refused "
                        "by default as a possible replay: devices refuse the downgrade anyway)")
    s.set_defaults(func=cmd_mirror_sync)

    s = sub.add_parser("boards", help="list the board definitions in boards/")
    s.add_argument("--json", action="store_true", help="a JSON list: each board.json plus its ota_slots")
    s.set_defaults(func=cmd_boards)

    s = sub.add_parser("config", help="write a device's ota_config.json (server, trusted keys, board)")
    s.add_argument("--pub", action="append", required=True, help="trusted release public key (repeatable)")
    s.add_argument("--server", required=True, help="release URL the device polls, e.g. http://192.168.1.10:8000")
    s.add_argument("--mirror", action="append", help="another release URL, tried in order (repeatable)")
    s.add_argument("--aes-key", action="append", help="AES key file for encrypted releases (repeatable)")
    s.add_argument("--ca", help="CA certificate (PEM or DER) that https servers are checked against")
    s.add_argument("--board", default="esp32", help="board definition in boards/ (default esp32)")
    s.add_argument("--device-id", default="", help="name the device reports")
    s.add_argument("--timeout", type=_timeout, default=10, metavar="SECONDS",
                   help="network timeout on the device (default 10)")
    _rollout_args(s)
    s.add_argument("--out", default="build/device/ota_config.json",
                   help="file to write (default build/device/ota_config.json; git ignores build/). With "
                        "--aes-key it holds device secrets and is written with mode 0600")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("mpy", help="compile the device agent to .mpy with mpy-cross",
                       description="Write OUT/<arch>/ota/*.mpy for each board architecture (or --arch).")
    s.add_argument("--out", default="build/mpy", help="output directory (default build/mpy)")
    s.add_argument("--arch", action="append", choices=("x64", "x86", "armv6m", "armv7m", "armv7emsp",
                                                        "armv7emdp", "xtensa", "xtensawin", "rv32imc"),
                   help="architecture (repeatable; default: every board's)")
    s.set_defaults(func=cmd_mpy)

    s = sub.add_parser("flash", help="put MicroPython firmware on a board with an OTA partition table (esptool)",
                       description="Check FIRMWARE (chip, size against the OTA slots), build the board's "
                                   "partition table, and write bootloader (if the firmware has one), "
                                   "partition table, erased otadata and the app to ota_0 with esptool. "
                                   "FIRMWARE is a MicroPython app image (build-*/micropython.bin) or a "
                                   "merged image from micropython.org (its partition table is replaced).")
    s.add_argument("firmware", help="MicroPython .bin (app image or merged image)")
    s.add_argument("--board", default="esp32", help="board definition in boards/ (default esp32; `mpota boards`)")
    s.add_argument("--port", help="serial port, e.g. /dev/ttyUSB0, /dev/ttyACM0, COM3 (default: the one ESP32 "
                                  "board attached, found by its USB bridge)")
    s.add_argument("--baud", type=_baud, default=460800, help="baud rate for writing (default 460800)")
    s.add_argument("--bootloader", help="bootloader .bin to write (default: the merged image's, else keep the board's)")
    s.add_argument("--erase-all", action="store_true", help="erase the whole flash first (the filesystem too); "
                                                            "needs a bootloader (merged image or --bootloader)")
    s.add_argument("--merged", metavar="FILE", help="write one image of everything to FILE, for an erased chip or "
                                                    "a production programmer (at 0x0); touches no board; needs "
                                                    "a bootloader")
    s.add_argument("--out", help="where to write the files that get flashed (default build/flash/BOARD)")
    s.add_argument("--dry-run", action="store_true", help="check and write the files, print the esptool command; "
                                                          "touch no board")
    s.add_argument("--no-progress", action="store_true", help="no progress bars (for scripts)")
    s.set_defaults(func=cmd_flash)

    s = sub.add_parser("deploy", help="copy the agent (.mpy), its config and a main.py to a board (mpremote)",
                       description="Ask the board what it runs, compile the agent for its architecture, "
                                   "write ota_config.json, and copy them (and the example main.py, if the "
                                   "board has none) with mpremote. Works with the simulator too: "
                                   "`mpota sim repl NAME --port N`, then --port socket://127.0.0.1:N.")
    s.add_argument("--port", help="mpremote port: /dev/ttyUSB0, /dev/ttyACM0, COM3, socket://HOST:PORT (default: "
                                  "the one ESP32 board attached, found by its USB bridge)")
    s.add_argument("--pub", action="append", help="trusted release public key (repeatable)")
    s.add_argument("--server", help="release URL the device polls, e.g. http://192.168.1.10:8000")
    s.add_argument("--mirror", action="append", help="another release URL, tried in order (repeatable)")
    s.add_argument("--aes-key", action="append", help="AES key file for encrypted releases (repeatable)")
    s.add_argument("--ca", help="CA certificate (PEM or DER) that https servers are checked against")
    s.add_argument("--config", help="an ota_config.json written by `mpota config` (instead of --pub/--server)")
    s.add_argument("--board", help="board definition (default: found from the board's MCU)")
    s.add_argument("--device-id", help="name the device reports (default: its machine.unique_id() in hex)")
    s.add_argument("--timeout", type=_timeout, default=10, metavar="SECONDS",
                   help="network timeout on the device (default 10)")
    s.add_argument("--main", help="copy this file as main.py (default: the example, only if the board has no main.py)")
    s.add_argument("--no-main", action="store_true", help="never touch main.py")
    s.add_argument("--wifi", metavar="SSID", help="write wifi.json for the example main.py "
                                                  "(password from $MPOTA_WIFI_PASSWORD)")
    s.add_argument("--source", action="store_true", help="copy .py sources instead of .mpy")
    s.add_argument("--status", action="store_true", help="print the board's ota.status() afterwards")
    s.add_argument("--reset", action="store_true", help="reset the board afterwards so main.py runs")
    s.add_argument("--json", action="store_true", help="print a JSON summary on stdout (with --status, the "
                                                       "board's ota.status() in it); progress goes to stderr")
    s.add_argument("--stage", help="where to stage the files (default build/deploy/BOARD)")
    s.add_argument("--dry-run", action="store_true", help="stage the files and print the mpremote command; "
                                                          "touch no board")
    _rollout_args(s)
    _fleet_args(s, "keys/fleet/DEVICE-ID.secret")
    s.set_defaults(func=cmd_deploy)

    s = sub.add_parser("push", help="install a signed release over a board's serial link (no network needed)",
                       description="Run the board's agent with this machine as its release source over the "
                                   "serial link: the same verification, resume and rollback as over HTTP. "
                                   "Works with boards, QEMU's serial (socket://) and `mpota sim repl`.")
    s.add_argument("release", help="release directory (mpota release --out DIR)")
    s.add_argument("--port", required=True, help="serial port: /dev/ttyUSB0, COM3, socket://HOST:PORT")
    s.add_argument("--baud", type=_baud, default=115200, help="baud rate of the REPL (default 115200)")
    s.add_argument("--timeout", type=_timeout, default=30, metavar="SECONDS",
                   help="give up when the board says nothing for this long (default 30)")
    s.add_argument("--reset", action="store_true", help="reset the board after a successful install")
    s.set_defaults(func=cmd_push)

    from .fleet.cli import add_parser as add_fleet_parser
    add_fleet_parser(sub, _bounded, _tcp_port)

    sim = sub.add_parser("sim", help="the simulated ESP32 (unix port): firmware, create, run, status, repl",
                         description="Simulated ESP32 devices on the MicroPython unix port.")
    ssub = sim.add_subparsers(dest="simverb", metavar="COMMAND", required=True)

    s = ssub.add_parser("firmware", help="build a simulated firmware image (a valid ESP app image)")
    s.add_argument("out", help="image file to write, e.g. fw-1.0.0.bin")
    s.add_argument("--version", required=True, help="version in esp_app_desc_t, e.g. 1.0.0")
    s.add_argument("--behavior", default="healthy", choices=BEHAVIORS,
                   help="how the firmware behaves when booted: healthy; unhealthy (its health check fails); "
                        "crash (panics at boot); raise (an exception before ota.confirm()); hang (hangs "
                        "before ota.confirm()); stuck (its health check never returns). Default healthy")
    s.add_argument("--size", type=_size, default=128 * 1024, help="approximate image size (default 128K)")
    s.add_argument("--chip", default="esp32", help="chip in the image header (default esp32)")
    s.add_argument("--secure-version", type=_counter, default=0, help="esp_app_desc_t secure_version")
    s.add_argument("--min-chip-rev", type=_chip_rev, default=0, metavar="MAJOR.MINOR",
                   help="lowest chip revision the image runs on (header min_chip_rev_full; default 0.0)")
    s.add_argument("--max-chip-rev", type=_chip_rev, default=0xFFFF, metavar="MAJOR.MINOR",
                   help="highest chip revision the image runs on (header max_chip_rev_full; default: none)")
    s.set_defaults(func=cmd_sim_firmware)

    def root_arg(s):
        s.add_argument("--root", default="devices", help="where simulated devices live (default ./devices)")

    s = ssub.add_parser("create", help="create a simulated device with firmware, agent and config")
    s.add_argument("name", help="device name, e.g. dev1")
    s.add_argument("--pub", action="append", required=True, help="trusted release public key (repeatable)")
    s.add_argument("--server", required=True, help="release URL, e.g. http://127.0.0.1:8000")
    s.add_argument("--firmware", required=True, help="image to put in ota_0")
    s.add_argument("--mirror", action="append", help="another release URL, tried in order (repeatable)")
    s.add_argument("--aes-key", action="append", help="AES key file for encrypted releases (repeatable)")
    s.add_argument("--ca", help="CA certificate (PEM or DER) that https servers are checked against")
    s.add_argument("--heap", type=_heap, default="128K", help="MicroPython heap (default 128K, ESP32-class)")
    s.add_argument("--source", action="store_true", help="install the agent as .py instead of .mpy")
    s.add_argument("--force", action="store_true", help="replace an existing device")
    s.add_argument("--chip-rev", type=_chip_rev, default=300, metavar="MAJOR.MINOR",
                   help="the chip's revision, checked against an image's min/max by set_boot() and the "
                        "bootloader (default 3.0)")
    s.add_argument("--rollback", choices=ROLLBACK_MODES, default="on",
                   help="CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE: on (bootloader and firmware, as stock "
                        "MicroPython), off (neither), bootloader-off (an older bootloader without it)")
    s.add_argument("--fs", choices=FS_KINDS, default="host",
                   help="the device's filesystem: host (a directory you can look into, default), or littlefs / "
                        "fat: a real filesystem in the flash's vfs partition, as on a board, whose writes power "
                        "cuts can tear")
    s.add_argument("--board-confirms", action="store_true",
                   help="the board's start-up code confirms every image (as ARDUINO_NANO_ESP32's board_init.c)")
    s.add_argument("--erase64", action="store_true",
                   help="a firmware whose Partition(label, 65536).ioctl(6) erases a 64 KiB block (stock MicroPython "
                        "refuses it, so updates erase 4 KiB sectors); see docs/simulator.md")
    root_arg(s)
    _rollout_args(s)
    _fleet_args(s, "DEVICE-DIR/fleet.secret")
    s.set_defaults(func=cmd_sim_create)

    s = ssub.add_parser("run", help="boot the device until it is idle, printing every boot")
    s.add_argument("name")
    s.add_argument("--heap", type=_heap, help="MicroPython heap for this run (default: the device's)")
    s.add_argument("--max-boots", type=int, default=8, help="give up after this many boots (default 8)")
    s.add_argument("--hang-after", type=_bounded("seconds", 1, 3600), default=120, metavar="SECONDS",
                   help="a boot still running after this long, with no watchdog to reset it, is reported "
                        "as hung and the run ends (default 120)")
    s.add_argument("--cut-at", type=_bounded("a flash operation number", 1, 10 ** 7), metavar="N",
                   help="cut the power at the N-th flash operation (erase or write) of the run, counted "
                        "across the bootloader and the firmware; the power comes back and the run goes on. "
                        "A run without it prints how many operations it did")
    s.add_argument("--tear", action="store_true", help="with --cut-at: that operation is torn (half of it happens)")
    s.add_argument("--net-time", type=_net_time, metavar="WHEN",
                   help="what NTP answers the board (ntptime): host (the host's clock, default), off (no NTP "
                        "server answers), a UTC time such as 2026-12-01T02:00Z (running on from there) or "
                        "+/-SECONDS from the host's clock; also $MPOTA_NET_TIME. The board's RTC starts at "
                        "2000-01-01 at every power-on (docs/simulator.md)")
    s.add_argument("--expect-version", metavar="V", help="exit 1 unless the device ends running version V")
    s.add_argument("--json", action="store_true",
                   help="print the summary as JSON on stdout (the boot log goes to stderr)")
    root_arg(s)
    s.set_defaults(func=cmd_sim_run)

    s = ssub.add_parser("status", help="print the device's ota.status() as JSON")
    s.add_argument("name")
    s.add_argument("--json", action="store_true", help="accepted for uniformity: the output is always JSON")
    root_arg(s)
    s.set_defaults(func=cmd_sim_status)

    s = ssub.add_parser("list", help="list the simulated devices: name, version, slot, last result")
    s.add_argument("--json", action="store_true", help="a JSON list of {name, version, slot, last_result, "
                                                       "last_error, path}")
    root_arg(s)
    s.set_defaults(func=cmd_sim_list)

    s = ssub.add_parser("delete", help="delete a simulated device (only a directory `sim create` made)")
    s.add_argument("name")
    root_arg(s)
    s.set_defaults(func=cmd_sim_delete)

    s = ssub.add_parser("repl", help="serve the device's REPL on a loopback TCP port (for mpremote, mpota deploy)",
                        description="Each connection gets a micropython REPL running as the device "
                                    "(its fs/, flash and running slot): mpremote connect socket://HOST:PORT.")
    s.add_argument("name")
    s.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=_tcp_port, default=5555, help="TCP port (default 5555; 0 picks a free one)")
    s.add_argument("--heap", type=_heap, help="MicroPython heap (default: the device's)")
    s.add_argument("--once", action="store_true", help="exit after the first session")
    root_arg(s)
    s.set_defaults(func=cmd_sim_repl)
    return p


class _ClosedPipeSafe:
    """stdout that turns into /dev/null when its reader goes away (`mpota boards | head -1`):
    the command finishes what it started (a simulated device is never left half-way through a
    flash write because nobody reads the log) and ends quietly, with its own exit status."""

    def __init__(self, stream):
        self._stream, self.closed_by_reader = stream, False

    def _gone(self):
        self.closed_by_reader = True
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError):
            pass

    def write(self, text):
        if not self.closed_by_reader:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._gone()
        return len(text)

    def flush(self):
        if not self.closed_by_reader:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._gone()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv=None) -> int:
    stdout = sys.stdout
    if not isinstance(stdout, _ClosedPipeSafe):
        sys.stdout = _ClosedPipeSafe(stdout)
    try:
        return _main(argv)
    finally:
        if not sys.stdout.closed_by_reader:
            sys.stdout = stdout  # a caller in the same process gets its stdout back


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except MpotaError as e:
        print(f"mpota: error: {e}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return 2
    except OSError as e:
        # a path the user gave that cannot be read or written, a port in use, ...: no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"mpota: error: {where}{e.strerror or e}", file=sys.stderr)
        print("  hint: check the paths and ports given (output directories must be writable)",
              file=sys.stderr)
        return 2
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
