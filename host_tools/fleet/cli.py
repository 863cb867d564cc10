"""`mpota fleet ...`: the verbs parse and check, then call the fleet package's functions (views
over a --db directly, or the admin API of a --server). Errors are MpotaError with a hint, as
everywhere in mpota (host_tools/cli.py prints them).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

from .. import MpotaError, read_input

DEFAULT_DB = "fleet.sqlite"


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1))


def _age(t, now) -> str:
    if t is None:
        return "never"
    s = max(0, now - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else \
        f"{s / 3600:.0f}h ago" if s < 172800 else f"{s / 86400:.0f}d ago"


# ---- where the fleet is: a database here, or a server's admin API -----------------------------
class Target:
    """--db DB (query functions over the database) or --server URL --token-file T (admin API)."""

    def __init__(self, a):
        if a.db and a.server:
            raise MpotaError("give --db or --server, not both",
                             hint="--db reads the database directly; --server asks a running `mpota fleet serve`")
        if not a.db and not a.server:
            if Path(DEFAULT_DB).exists():
                a.db = DEFAULT_DB
            else:
                raise MpotaError("which fleet? give --db fleet.sqlite|postgresql://... or --server URL --token-file T",
                                 hint="`mpota fleet serve --db fleet.sqlite` starts one (and writes fleet.sqlite.token)")
        self.store = self.admin = None
        if a.db:
            from .storage import Store
            self.store = Store(a.db, create=getattr(a, "create", False))
        else:
            from .client import Admin
            from .server import load_token
            if not a.token_file:
                raise MpotaError("--server needs --token-file (the admin token)",
                                 hint="the file given to `mpota fleet serve --token-file` (default DB.token)")
            self.admin = Admin(a.server, load_token(Path(a.token_file), create=False))

    def close(self):
        if self.store is not None:
            self.store.close()


def _target_args(s, *, writes=False):
    g = s.add_argument_group("which fleet (one of)")
    g.add_argument("--db", help="the fleet database: a SQLite file or postgresql://USER@HOST:PORT/DB "
                                f"(default {DEFAULT_DB} if it exists)" + ("; created if absent" if writes else ""))
    g.add_argument("--server", metavar="URL", help="a running `mpota fleet serve`, e.g. http://127.0.0.1:8470")
    g.add_argument("--token-file", metavar="FILE", help="with --server: the admin token file")


# ---- verbs ----------------------------------------------------------------------------------
def cmd_serve(a):
    from . import server
    from .storage import describe, engine_url
    engine_url(a.db)  # a --db this server cannot use is refused before anything is written
    token_file = Path(a.token_file) if a.token_file else server.default_token_file(a.db)
    if token_file is None:
        raise MpotaError("--db postgresql://... needs --token-file FILE (the admin token, shared by every "
                         "server process)", hint="e.g. --token-file fleet.token (written with a random token if absent)")
    token = server.load_token(token_file)
    rollout_key = None
    if a.rollout_key:
        from . import rollouts
        rollout_key = rollouts.load_key(a.rollout_key)

    def announce(url, store):
        print(f"{server.FIRST_LINE}{url}", flush=True)
        if a.host in ("0.0.0.0", "::"):
            from ..server import urls_for
            lan = [u.rstrip("/") for u in urls_for(a.host, int(url.rsplit(":", 1)[1]))]
            if lan:
                print(f"mpota fleet: devices on the network use fleet.url {lan[0]}"
                      + (f" (or {', '.join(lan[1:])})" if lan[1:] else ""), flush=True)
        kind = "SQLite, one server process" if store.kind == "sqlite" else "PostgreSQL"
        print(f"mpota fleet: database {describe(a.db)} ({kind}); admin token in {token_file}", flush=True)
        if rollout_key is not None:
            from ..keys import keyid
            print(f"mpota fleet: rollouts evaluated every {a.rollout_interval:g} s, rollout.json signed by rollout "
                  f"key {keyid(rollout_key.public_key())}", flush=True)
        print(f"mpota fleet: devices post to {url}/v1/reports; dashboard {url}/ (sign in with the token); "
              "Ctrl-C stops", flush=True)
    try:
        server.serve(a.db, a.host, a.port, token, access_log=not a.quiet, body_timeout=a.body_timeout,
                     announce=announce, rollout_key=rollout_key, rollout_interval=a.rollout_interval)
    except KeyboardInterrupt:
        pass
    print("mpota fleet: stopped", flush=True)


def _secret(a) -> str:
    from . import protocol
    path = Path(a.secret_file)
    if a.generate:
        if path.exists():
            raise MpotaError(f"{path} exists: --generate writes a new secret only into a new file",
                             hint="drop --generate to register the secret it holds")
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32).hex()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        print(f"fleet: wrote a new device secret to {path} (mode 0600; it goes into the device's config as "
              f"fleet.secret; never commit it)", file=sys.stderr)
        return secret
    text = read_input(path, "the device secret", hint="--generate writes a new one").decode(errors="replace")
    try:
        return protocol.parse_secret(text).hex()
    except ValueError as e:
        raise MpotaError(f"{path}: {e}", hint="`mpota fleet register ID --secret-file F --generate` writes one") from None


def cmd_register(a):
    secret = _secret(a)
    a.create = True
    t = Target(a)
    try:
        if t.store is not None:
            created = t.store.register(a.id, secret, board=a.board, interval_s=a.interval, cohort=a.cohort)
        else:
            created = t.admin.register(a.id, secret, board=a.board, interval_s=a.interval, cohort=a.cohort)["created"]
    finally:
        t.close()
    where = a.db or a.server
    print(f"fleet: {'registered' if created else 'updated'} {a.id} in {where}"
          + ("" if created else " (new secret; its reports and history are kept)"))


def cmd_unregister(a):
    t = Target(a)
    try:
        if t.store is not None:
            done = t.store.unregister(a.id, forget=a.forget)
        else:
            done = t.admin.unregister(a.id, forget=a.forget).get("deleted", False)
    finally:
        t.close()
    if not done:
        raise MpotaError(f"no device {a.id} in {a.db or a.server}", hint="`mpota fleet devices` lists them")
    print(f"fleet: {a.id} " + ("and its history removed" if a.forget else
                               "unregistered (its reports are refused from now on; its history is kept)"))


def cmd_devices(a):
    from . import views
    filters = {"board": a.board, "chip": a.chip, "version": a.version, "status": a.status, "cohort": a.cohort,
               "seen_before": a.seen_before, "seen_after": a.seen_after, "silent": "1" if a.silent else None,
               "silent_since": a.silent_since}
    t = Target(a)
    try:
        if t.store is not None:
            doc = views.list_devices(t.store, filters, limit=a.limit)
        else:
            doc = t.admin.devices(**{k: v for k, v in filters.items() if v is not None}, limit=a.limit)
    finally:
        t.close()
    if a.json:
        return _print_json(doc)
    rows, now = doc["devices"], doc["now"]
    if not rows:
        print("fleet: no devices" + (" match" if any(filters.values()) else ""))
        return
    print(f"{'DEVICE':20} {'STATUS':15} {'VERSION':12} {'BOARD':10} {'SLOT':6} {'LAST RESULT':28} LAST SEEN")
    for d in rows:
        res = (d["last_result"] or "-") + (f" ({d['last_error']})" if d["last_error"] else "")
        print(f"{d['id']:20} {d['status']:15} {d['version'] or '-':12} {d['board'] or '-':10} {d['slot'] or '-':6} "
              f"{res:28} {_age(d['last_seen'], now)}")
    if doc["count"] > len(rows):
        print(f"fleet: {len(rows)} of {doc['count']} shown (--limit)")


def cmd_device(a):
    from . import views
    t = Target(a)
    try:
        doc = views.device_detail(t.store, a.id, limit=a.limit) if t.store is not None else t.admin.device(a.id, a.limit)
    finally:
        t.close()
    if doc is None:
        raise MpotaError(f"no device {a.id}", hint="`mpota fleet devices` lists them")
    if a.json:
        return _print_json(doc)
    d, now = doc["device"], doc["now"]
    print(f"{d['id']}: {d['status']}, running {d['version'] or '?'} in {d['slot'] or '?'} on {d['board'] or '?'}/"
          f"{d['chip'] or '?'}, last seen {_age(d['last_seen'], now)}, cohort {d['cohort']}, check every "
          f"{d['interval_s']} s" + ("" if d["registered"] else " (not registered: known from logs only)"))
    print(f"  last result {d['last_result'] or '-'}" + (f" ({d['last_error']})" if d["last_error"] else "")
          + (f"; waiting for {d['pending']} to confirm" if d["pending"] else "")
          + f"; {d['reports']} reports, {d['dropped']} dropped on the device")
    for at in doc["attempts"]:
        print(f"  release {at['release']}: {at['outcome']}" + (f" ({at['code']})" if at["code"] else "")
              + f", from {at['from_version'] or '?'}")
    _print_events(doc["events"])


def _print_events(evs):
    from .views import iso
    for e in evs:
        print(f"  {iso(e['received_at'])} {e['device']:16} #{e['n'] or '-':<6} {e['event']:12} "
              f"{e['code'] or e['result'] or '':18} {e['version'] or '-':10} {e['target'] or ''} {e['detail'] or ''}".rstrip())


def cmd_events(a):
    from . import views
    t = Target(a)
    try:
        if t.store is not None:
            doc = views.list_events(t.store, device=a.device, event=a.event, limit=a.limit)
        else:
            doc = t.admin.events(device=a.device, event=a.event, limit=a.limit)
    finally:
        t.close()
    if a.json:
        return _print_json(doc)
    if not doc["events"]:
        print("fleet: no events")
    _print_events(doc["events"])


def cmd_import_logs(a):
    from . import logs
    from .storage import Store
    lines = []
    for f in a.file:
        data = sys.stdin.buffer.read() if f == "-" else read_input(f, "the log", hint="a Common/Combined Log "
                                                                                     "Format access log")
        lines += data.decode("utf-8", errors="replace").splitlines()
    res = logs.parse(lines)
    store = Store(a.db)
    try:
        done = store.import_announces(res.items, register_unknown=not a.known_only)
    finally:
        store.close()
    out = {"lines": res.lines, "announces": len(res.items), "imported": done["imported"],
           "duplicates": done["duplicates"], "devices": done["devices"], "unknown_skipped": done["unknown"],
           "skipped": res.skipped}
    if a.json:
        return _print_json(out)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(res.skipped.items()))
    print(f"fleet: {res.lines} lines, {len(res.items)} name a device: {done['imported']} imported for "
          f"{done['devices']} device(s), {done['duplicates']} already imported"
          + (f", {done['unknown']} of unregistered devices left out (--known-only)" if done["unknown"] else "")
          + (f"; skipped: {skipped}" if skipped else ""))


def _simple(name):
    def cmd(a):
        from . import views
        t = Target(a)
        try:
            doc = getattr(views, name)(t.store) if t.store is not None else getattr(t.admin, name)()
        finally:
            t.close()
        if a.json:
            return _print_json(doc)
        if name == "releases":
            for r in doc["releases"]:
                print(f"{r['release']:12} {r['devices']:6} devices: {r['installed']} installed, {r['confirmed']} "
                      f"confirmed, {r['rolled_back']} rolled back, {r['failed_silent']} failed-silent, "
                      f"{r['refused']} refused, {r['failed']} failed")
            for t_ in doc["regressions"]:
                print(("ALARM: " if t_["alarm"] else "") + t_["reason"])
        else:
            for x in doc["anomalies"]:
                print(f"{x['kind']:14} {x.get('device') or x.get('release')}: {x['reason']}")
            if not doc["anomalies"]:
                print("fleet: no anomalies")
    return cmd


# ---- rollouts (docs/rollout.md "Fleet server") --------------------------------------------------
def _rollout_key(a, *, needed: bool):
    from . import rollouts
    if a.server:
        if a.key:
            raise MpotaError("--key goes with --db: through --server, the server signs with its --rollout-key",
                             hint="drop --key")
        return None
    if a.key:
        return rollouts.load_key(a.key)
    if needed:
        raise MpotaError("with --db, starting a rollout writes its first rollout.json here: give --key FILE (the "
                         "rollout key)", hint="or go through the server: --server URL --token-file T")
    return None


def cmd_rollout_start(a):
    from . import rollouts
    cfg = {"stages_bp": a.stages, "min_devices": a.min_devices, "max_failure_rate": a.max_failure_rate,
           "silent_after_s": a.silent_after, "valid_for_s": a.valid_for, "targets": _targets(a.targets),
           "window": a.window}
    key = _rollout_key(a, needed=True)
    a.create = True
    t = Target(a)
    try:
        release_dir = str(Path(a.release_dir).resolve())
        if t.store is not None:
            row = rollouts.start(t.store, key, release_dir, cfg, rollout_id=a.id)
            doc = rollouts.status(t.store, row["id"])
        else:
            doc = t.admin.start_rollout(release_dir, id=a.id, **cfg)
    finally:
        t.close()
    if a.json:
        return _print_json(doc)
    r = doc["rollout"]
    print(f"fleet: rollout {r['id']} of {r['version']} started: stage 1 of {r['stages']} "
          f"({r['share_bp'] / 100:g} % of the fleet); {Path(r['path']) / 'rollout.json'} signed (issued "
          f"{r['issued']}, expires {_iso(r['expires'])})")
    if t.store is not None:
        print("fleet: a `mpota fleet serve --rollout-key ...` on this database advances it")


def _iso(t):
    from .views import iso
    return iso(t) or "-"


def cmd_rollout_act(action):
    def cmd(a):
        from . import rollouts
        key = _rollout_key(a, needed=False)
        t = Target(a)
        try:
            if t.store is not None:
                if t.store.rollout(a.id) is None:
                    raise MpotaError(f"no rollout {a.id}", hint="`mpota fleet rollout status` lists them")
                rollouts.act(t.store, key, a.id, action, getattr(a, "reason", None))
                doc = rollouts.status(t.store, a.id)
            else:
                doc = t.admin.rollout_action(a.id, action, getattr(a, "reason", None))
        finally:
            t.close()
        if a.json:
            return _print_json(doc)
        r = doc["rollout"]
        print(f"fleet: rollout {r['id']} is {r['state']}" + (f" ({r['reason']})" if r["reason"] else "")
              + f", stage {r['stage']} of {r['stages']}")
        if action == "halt" and t.store is not None and key is None:
            print("fleet: recorded; the server signs the halted rollout.json at its next evaluation "
                  "(give --key to sign it now)")
    return cmd


def cmd_rollout_status(a):
    from . import rollouts
    t = Target(a)
    try:
        if a.id is None:
            doc = rollouts.list_rollouts(t.store) if t.store is not None else t.admin.rollouts()
        else:
            doc = rollouts.status(t.store, a.id) if t.store is not None else t.admin.rollout(a.id)
            if doc is None:
                raise MpotaError(f"no rollout {a.id}", hint="`mpota fleet rollout status` lists them")
    finally:
        t.close()
    if a.json:
        return _print_json(doc)
    if a.id is None:
        if not doc["rollouts"]:
            print("fleet: no rollouts (mpota fleet rollout start RELEASE_DIR ...)")
        for r in doc["rollouts"]:
            print(f"{r['id']:20} {r['version']:12} {r['state']:9} stage {r['stage']}/{r['stages']} "
                  f"{r['share_bp'] / 100:>6g} %  {r['path']}" + (f"  ({r['reason']})" if r["reason"] else ""))
        return
    r = doc["rollout"]
    print(f"{r['id']}: {r['version']} ({r['release'][:16]}…) in {r['path']}: {r['state']}, stage {r['stage']} of "
          f"{r['stages']}, {r['share_bp'] / 100:g} % of the fleet; document issued {r['issued']}, expires "
          f"{_iso(r['expires'])}, {r['exclude']} device(s) excluded")
    if r["reason"]:
        print(f"  reason: {r['reason']}")
    print(f"  {'STAGE':6} {'SHARE':>7} {'DEVICES':>8} {'CONFIRMED':>10} {'FAILED':>7} {'PENDING':>8} {'RATE':>7}")
    for k, s in enumerate(doc["stages"]):
        mark = "*" if k + 1 == r["stage"] else " "
        rate = "-" if s["rate"] is None else f"{s['rate']:.1%}"
        print(f" {mark}{k + 1:<6} {s['share_bp'] / 100:>6g}% {s['devices']:>8} {s['confirmed']:>10} {s['failed']:>7} "
              f"{s['pending']:>8} {rate:>7}")
    print(f"  now: {doc['decision']['action']}: {doc['decision']['reason']}")
    print(f"  halting test: {doc['test']['reason']}")
    for h in doc["history"][:a.limit]:
        print(f"  {_iso(h['at'])} {h['action']:9} {h['by']:7} stage {(h['stage'] or 0) + 1}"
              + (f" issued {h['issued']}" if h.get("issued") else "") + (f": {h['reason']}" if h["reason"] else ""))


def _stages(text: str) -> list[int]:
    """--stages 1,10,50,100 (percent of the fleet) -> share_bp."""
    out = []
    for part in text.split(","):
        try:
            pct = float(part)
        except ValueError:
            pct = -1.0
        bp = round(pct * 100)
        if not 0 < pct <= 100 or abs(pct * 100 - bp) > 1e-6:
            raise argparse.ArgumentTypeError(f"{part!r}: each stage is a percent of the fleet from 0.01 to 100 "
                                             "(steps of 0.01), e.g. 1,10,50,100")
        out.append(bp)
    if any(b <= a for a, b in zip(out, out[1:])):
        raise argparse.ArgumentTypeError(f"{text!r}: stages must grow, e.g. 1,10,50,100")
    return out


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    """45s, 30m, 2h, 1d, or plain seconds."""
    t = text.strip().lower()
    try:
        n = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        n = -1
    if not 0 < n <= 366 * 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration such as 90s, 30m, 2h or 1d")
    return int(n)


def _rate(text: str) -> float:
    t = text.strip()
    try:
        r = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        r = -1
    if not 0 < r < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a failure rate above 0 and below 1, e.g. 0.05 or 5%")
    return r


def _window(text: str) -> dict:
    """CRON,DURATION[,UTC_OFFSET_MIN[,JITTER]]"""
    from .. import rolloutdoc
    parts = [p.strip() for p in text.split(",")]
    if not 2 <= len(parts) <= 4:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'CRON,DURATION[,UTC_OFFSET_MIN[,JITTER]]', "
                                         "e.g. '0 2 * * *,2h,60,15m'")
    try:
        w = {"cron": parts[0], "duration_s": _duration(parts[1])}
        if len(parts) > 2:
            w["utc_offset_min"] = int(parts[2])
        if len(parts) > 3:
            w["jitter_s"] = _duration(parts[3]) if parts[3] not in ("0", "0s") else 0
        return rolloutdoc.check_window(w)
    except (ValueError, MpotaError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _targets(items) -> dict | None:
    out = {}
    for item in items or ():
        kind, _, names = item.partition("=")
        if kind not in ("boards", "groups", "devices") or not names:
            raise MpotaError(f"--targets {item!r}: give boards=A,B groups=C devices=D (any of them)",
                             hint="e.g. --targets boards=esp32 groups=canary,line-3")
        out.setdefault(kind, []).extend(n for n in names.split(",") if n)
    return out or None


# ---- parser ---------------------------------------------------------------------------------
def _needs_extra(func):
    def run(a):
        try:
            return func(a)
        except ImportError as e:
            if e.name and e.name.split(".")[0] in ("sqlalchemy", "starlette", "uvicorn", "jinja2", "scipy", "psycopg"):
                raise MpotaError(f"the fleet server needs {e.name}, which is not installed",
                                 hint="pip install 'mpota[fleet]' (make test installs it into .venv)") from None
            raise
    return run


def _device_id(text: str) -> str:
    from . import protocol
    if not protocol.valid_device_id(text):
        raise argparse.ArgumentTypeError(f"{text!r}: a device id is 1-64 of A-Z a-z 0-9 . _ : -")
    return text


def _time(text: str) -> float:
    from .views import parse_time
    try:
        return parse_time(text)
    except MpotaError as e:
        raise argparse.ArgumentTypeError(f"{e} ({e.hint})") from None


def _interval(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.05 <= v <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds from 0.05 to 3600")
    return v


def _rollout_parsers(fsub):
    from .. import rolloutdoc
    ro = fsub.add_parser("rollout", help="phased rollouts that advance and halt themselves",
                         description="A rollout publishes RELEASE_DIR/rollout.json, signed by the rollout key: "
                                     "which share of the fleet may install the release now. The server (mpota "
                                     "fleet serve --rollout-key) advances it stage by stage as devices confirm, "
                                     "halts it when failures are conclusive, and re-signs the document. "
                                     "docs/rollout.md \"Fleet server\".")
    rsub = ro.add_subparsers(dest="rolloutverb", metavar="COMMAND", required=True)

    def verb(name, func, **kw):
        s = rsub.add_parser(name, **kw)
        s.set_defaults(func=_needs_extra(func))
        return s

    s = verb("start", cmd_rollout_start, help="start a rollout of a release directory",
             description="Record a rollout of the release in RELEASE_DIR and write its first rollout.json "
                         "(stage 1). A stage advances when --min-devices of its devices confirmed (or all of "
                         "them, if fewer exist) with a failure rate below --max-failure-rate; the rollout halts "
                         "when a one-sided exact binomial test finds the failure rate above it (p < 0.01/(n(n+1)) on n ended attempts: at most 1 % false alarms), or "
                         "the monitor finds the release a regression.")
    s.add_argument("release_dir", metavar="RELEASE_DIR", help="the release directory (manifest.json; rollout.json "
                                                              "is written there: the server needs write access)")
    s.add_argument("--stages", type=_stages, required=True, metavar="PCT,...",
                   help="shares of the fleet in percent, growing, e.g. 1,10,50,100")
    s.add_argument("--min-devices", type=_positive, required=True, metavar="N",
                   help="confirmations a stage needs before the next (all its devices if fewer exist)")
    s.add_argument("--max-failure-rate", type=_rate, required=True, metavar="R",
                   help="a stage advances only below this failure rate; the rollout halts when the evidence "
                        "says the rate is above it (e.g. 0.05 or 5%%)")
    s.add_argument("--silent-after", type=_duration, required=True, metavar="T",
                   help="an install followed by this long without a word is a failure (e.g. 2h)")
    s.add_argument("--window", type=_window, metavar="CRON,DURATION[,UTC_OFFSET_MIN[,JITTER]]",
                   help="maintenance window in the document, e.g. '0 2 * * *,2h,60,15m' (docs/rollout.md)")
    s.add_argument("--targets", nargs="+", metavar="KIND=NAMES",
                   help=f"only these: boards=A,B groups=C devices=D (groups: the devices' cohorts on the "
                        f"server; at most {rolloutdoc.MAX_NAMES} names)")
    s.add_argument("--valid-for", type=_duration, default=86400, metavar="DURATION",
                   help="each document expires this long after it is signed; re-signed at half-life (default 1d)")
    s.add_argument("--id", help="the rollout's id (default r-YYYYMMDD-N)")
    s.add_argument("--key", metavar="FILE", help="with --db: the rollout key that signs the first document")
    s.add_argument("--json", action="store_true", help="the rollout's status as JSON")
    _target_args(s)

    for name, what in (("pause", "freeze the share (evidence is still judged: a conclusive failure halts)"),
                       ("resume", "let a paused rollout advance again"),
                       ("halt", "stop the rollout: rollout.json says halted, no device installs")):
        s = verb(name, cmd_rollout_act(name), help=what, description=what[0].upper() + what[1:] + ".")
        s.add_argument("id", metavar="ID", help="the rollout (mpota fleet rollout status lists them)")
        s.add_argument("--reason", required=name == "halt", metavar="TEXT",
                       help="why (shown on the dashboard" + (" and in the document)" if name == "halt" else ")"))
        if name == "halt":
            s.add_argument("--key", metavar="FILE", help="with --db: sign the halted document now (else the "
                                                         "server does at its next evaluation)")
        s.set_defaults(key=None)
        s.add_argument("--json", action="store_true", help="the rollout's status as JSON")
        _target_args(s)

    s = verb("status", cmd_rollout_status, help="rollouts, or one rollout's stages, decision and history")
    s.add_argument("id", nargs="?", metavar="ID", help="one rollout (default: list them)")
    s.add_argument("--limit", type=_positive, default=20, help="history lines shown (default 20)")
    s.add_argument("--json", action="store_true", help='{"now", "rollouts"} or one rollout\'s full status')
    _target_args(s)


def _positive(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10 ** 6:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from 1")
    return int(text)


def add_parser(sub, bounded, tcp_port):
    from . import inventory, protocol
    fl = sub.add_parser("fleet", help="the fleet server: reports, inventory, statistics, dashboard",
                        description="Devices report what they did to `mpota fleet serve` (HMAC-signed); the "
                                    "inventory, release statistics and anomalies are derived from those "
                                    "reports. docs/fleet.md.")
    fsub = fl.add_subparsers(dest="fleetverb", metavar="COMMAND", required=True)
    add = fsub.add_parser

    def add_parser_(*args, **kw):  # every verb: a missing [fleet] extra is an error with a hint
        s = add(*args, **kw)
        orig = s.set_defaults

        def set_defaults(func=None, **kw2):
            return orig(func=_needs_extra(func), **kw2) if func else orig(**kw2)
        s.set_defaults = set_defaults
        return s
    fsub.add_parser = add_parser_

    s = fsub.add_parser("serve", help="run the fleet server (reports, admin API, dashboard)",
                        description="Serve POST /v1/reports, the admin API and the dashboard. The first line "
                                    "printed is 'mpota fleet: serving on URL'. SQLite: one process; PostgreSQL: "
                                    "as many processes as you like, behind any load balancer.")
    s.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB}, created if absent) or "
                                                    "postgresql://USER[:PASSWORD]@HOST:PORT/DB")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for devices "
                                                       "on the network)")
    s.add_argument("--port", type=tcp_port, default=8470, help="port (default 8470; 0 picks a free one)")
    s.add_argument("--token-file", help="admin token file, written with a random token if absent (default: "
                                        "DB.token beside a SQLite file; required with PostgreSQL)")
    s.add_argument("--quiet", action="store_true", help="no request log")
    s.add_argument("--body-timeout", type=bounded("seconds", 1, 300), default=int(protocol.BODY_TIMEOUT_S),
                   metavar="SECONDS", help="a report body must arrive within this (default 10; 408 otherwise)")
    s.add_argument("--rollout-key", metavar="FILE", help="the rollout role's private key (mode 0600): with it the "
                                                         "server advances and halts rollouts and signs their "
                                                         "rollout.json (docs/rollout.md)")
    s.add_argument("--rollout-interval", type=_interval, default=10.0, metavar="SECONDS",
                   help="evaluate the rollouts this often (default 10; one process does it among several)")
    s.set_defaults(func=cmd_serve)

    s = fsub.add_parser("register", help="register a device (or rotate its secret)",
                        description="Register device ID with the secret in --secret-file (64 hex digits, "
                                    "the device config's fleet.secret), offline into --db or through a "
                                    "server's admin API.")
    s.add_argument("id", type=_device_id, help="device id (the device config's device_id)")
    s.add_argument("--secret-file", required=True, help="file holding the device's secret (64 hex digits)")
    s.add_argument("--generate", action="store_true", help="write a new random secret into --secret-file "
                                                           "(mode 0600; refuses to overwrite)")
    s.add_argument("--board", help="board, until the device's own reports say")
    s.add_argument("--interval", type=bounded("seconds", 1, 30 * 86400), metavar="SECONDS",
                   help=f"the device's check interval (fleet.interval_s; default {inventory.DEFAULT_INTERVAL_S}): "
                        "silent for longer than about twice this after an install is failed-silent")
    s.add_argument("--cohort", help=f"the device's cohort for the statistics (default {inventory.DEFAULT_COHORT})")
    _target_args(s, writes=True)
    s.set_defaults(func=cmd_register)

    s = fsub.add_parser("unregister", help="unregister a device (its reports are refused from then on)")
    s.add_argument("id", type=_device_id)
    s.add_argument("--forget", action="store_true", help="remove its inventory and history too")
    _target_args(s)
    s.set_defaults(func=cmd_unregister)

    s = fsub.add_parser("devices", help="the inventory: devices, filtered",
                        description="Devices as their reports describe them. Filters combine (and).")
    s.add_argument("--board")
    s.add_argument("--chip")
    s.add_argument("--version", help="running version")
    s.add_argument("--status", choices=inventory.STATUSES)
    s.add_argument("--cohort")
    s.add_argument("--seen-before", type=_time, metavar="TIME", help="last seen before TIME (epoch or ISO 8601)")
    s.add_argument("--seen-after", type=_time, metavar="TIME", help="last seen at or after TIME")
    s.add_argument("--silent-since", type=_time, metavar="TIME", help="heard nothing since TIME (= --seen-before)")
    s.add_argument("--silent", action="store_true", help="only devices silent for longer than their interval allows")
    s.add_argument("--limit", type=bounded("devices", 1, 100000), default=1000, help="at most this many (default 1000)")
    s.add_argument("--json", action="store_true", help='{"now", "count", "offset", "devices": [...]}')
    _target_args(s)
    s.set_defaults(func=cmd_devices)

    s = fsub.add_parser("device", help="one device: inventory, attempts, history")
    s.add_argument("id", type=_device_id)
    s.add_argument("--limit", type=bounded("events", 1, 10000), default=30, help="events shown (default 30)")
    s.add_argument("--json", action="store_true", help='{"now", "device", "attempts", "events"}')
    _target_args(s)
    s.set_defaults(func=cmd_device)

    s = fsub.add_parser("events", help="reports received, newest first")
    s.add_argument("--device", type=_device_id)
    s.add_argument("--event", choices=(*protocol.EVENTS, protocol.ANNOUNCE))
    s.add_argument("--limit", type=bounded("events", 1, 10000), default=50, help="default 50")
    s.add_argument("--json", action="store_true", help='{"events": [...]}')
    _target_args(s)
    s.set_defaults(func=cmd_events)

    s = fsub.add_parser("releases", help="per release, board and cohort: install, confirm, rollback rates")
    s.add_argument("--json", action="store_true", help='{"now", "releases", "regressions", "alpha"}')
    _target_args(s)
    s.set_defaults(func=_simple("releases"))

    s = fsub.add_parser("anomalies", help="regressions, boot loops, outliers, failed-silent devices")
    s.add_argument("--json", action="store_true", help='{"now", "alpha", "anomalies": [...]}')
    _target_args(s)
    s.set_defaults(func=_simple("anomalies"))

    _rollout_parsers(fsub)

    s = fsub.add_parser("import-logs", help="read web server access logs (Common/Combined) into the inventory",
                        description="Devices with announce=true name themselves in manifest fetches (query "
                                    "string ?d=ID&v=VERSION&r=EVENT[:CODE] and/or User-Agent mpota/AGENT "
                                    "(d=..; v=..; r=..)). Each such line becomes an `announce` event; "
                                    "importing the same line twice keeps one.")
    s.add_argument("file", nargs="+", help="access log file(s); - reads stdin")
    s.add_argument("--db", required=True, help="the fleet database (SQLite file or postgresql://...)")
    s.add_argument("--known-only", action="store_true", help="skip devices that are not registered (default: "
                                                            "add them to the inventory, unregistered)")
    s.add_argument("--json", action="store_true", help='{"lines", "announces", "imported", "duplicates", '
                                                       '"devices", "unknown_skipped", "skipped"}')
    s.set_defaults(func=cmd_import_logs)
    return fl
