"""Storage: one interface over SQLite (the default: a file, nothing to set up, one server
process) and PostgreSQL (several server processes behind a load balancer), with SQLAlchemy Core.

Only moves data in and out: what a report does to the inventory is inventory.apply(), the
statistics are monitor.py's. A batch of reports is one transaction, serialized per device
(SELECT ... FOR UPDATE on PostgreSQL; BEGIN IMMEDIATE on SQLite, one writer at a time), and the
server acknowledges it only after COMMIT returned.
"""
from __future__ import annotations

import hashlib
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event as sa_event

from .. import MpotaError
from . import inventory
from .protocol import Batch, Refusal

SCHEMA_VERSION = 1
_T = sa.Double()  # seconds since the epoch, as the server's clock saw it

metadata = sa.MetaData()
devices = sa.Table(
    "devices", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("secret", sa.String(64)),            # hex; null: known only from web server logs
    sa.Column("cohort", sa.String(64), nullable=False),
    sa.Column("interval_s", sa.Integer, nullable=False),
    sa.Column("registered_at", _T),
    sa.Column("board", sa.String(64), index=True),
    sa.Column("chip", sa.String(64), index=True),
    sa.Column("version", sa.String(64), index=True),
    sa.Column("slot", sa.String(64)),
    sa.Column("slots", sa.JSON),
    sa.Column("last_event", sa.String(16)),
    sa.Column("last_code", sa.String(64)),
    sa.Column("last_detail", sa.String(160)),
    sa.Column("last_result", sa.String(16)),
    sa.Column("last_error", sa.String(64)),
    sa.Column("last_seen", _T, index=True),
    sa.Column("first_seen", _T),
    sa.Column("last_n", sa.BigInteger, nullable=False),
    sa.Column("boots", sa.BigInteger),
    sa.Column("reset", sa.BigInteger),
    sa.Column("heap", sa.BigInteger),
    sa.Column("target", sa.String(64)),
    sa.Column("pending", sa.String(64)),
    sa.Column("pending_since", _T),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("silent_at", _T, index=True),
    sa.Column("reports", sa.BigInteger, nullable=False),
    sa.Column("dropped", sa.BigInteger, nullable=False),
    sa.Column("source", sa.String(8)),
)
events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("n", sa.BigInteger),                 # null for log lines
    sa.Column("event", sa.String(16), nullable=False),
    sa.Column("code", sa.String(64)),
    sa.Column("detail", sa.String(160)),
    sa.Column("version", sa.String(64)),
    sa.Column("slot", sa.String(64)),
    sa.Column("slots", sa.JSON),
    sa.Column("board", sa.String(64)),
    sa.Column("chip", sa.String(64)),
    sa.Column("target", sa.String(64)),
    sa.Column("digest", sa.String(64)),
    sa.Column("boots", sa.BigInteger),
    sa.Column("reset", sa.BigInteger),
    sa.Column("heap", sa.BigInteger),
    sa.Column("dropped", sa.BigInteger),
    sa.Column("result", sa.String(80)),             # announce: the event[:code] the device named
    sa.Column("source", sa.String(8), nullable=False),   # report | log
    sa.Column("received_at", _T, nullable=False),
    sa.Column("dedup", sa.String(64)),              # log lines: sha256 of the line
    sa.UniqueConstraint("device", "n", name="events_device_n"),
    sa.UniqueConstraint("device", "dedup", name="events_device_dedup"),
    sa.Index("events_device_id", "device", "id"),
    sa.Index("events_received", "received_at"),
    sa.Index("events_event_id", "event", "id"),
)
attempts = sa.Table(
    "attempts", metadata,
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("release", sa.String(64), primary_key=True, index=True),
    sa.Column("board", sa.String(64)),
    sa.Column("cohort", sa.String(64)),
    sa.Column("from_version", sa.String(64)),
    sa.Column("started_at", _T),
    sa.Column("installed_at", _T),
    sa.Column("confirmed_at", _T),
    sa.Column("rolled_back_at", _T),
    sa.Column("ended_at", _T),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("code", sa.String(64)),
    sa.Column("last_at", _T),
    sa.Column("tries", sa.Integer),
)
counters = sa.Table(
    "counters", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("n", sa.BigInteger, nullable=False),
)
meta = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.String(32), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)
rollouts = sa.Table(
    "rollouts", metadata,
    sa.Column("id", sa.String(64), primary_key=True),          # the document's `rollout`
    sa.Column("release", sa.String(64), nullable=False, index=True),  # manifest envelope SHA-256
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("path", sa.String(1024), nullable=False),        # the release directory: rollout.json goes there
    sa.Column("config", sa.JSON, nullable=False),              # rollout.check_config()
    sa.Column("stage", sa.Integer, nullable=False),            # index into config.stages_bp
    sa.Column("stage_at", sa.JSON, nullable=False),            # when each stage reached began
    sa.Column("state", sa.String(16), nullable=False, index=True),  # running | paused | halted | complete
    sa.Column("reason", sa.String(400)),                       # of the halt or pause, as shown
    sa.Column("document", sa.JSON),                            # the body signed last
    sa.Column("issued", sa.BigInteger),                        # its issued (= document.issued)
    sa.Column("rev", sa.Integer, nullable=False),              # +1 at every change (optimistic check)
    sa.Column("created_at", _T, nullable=False),
    sa.Column("updated_at", _T, nullable=False),
    sa.Column("ended_at", _T),
)
rollout_events = sa.Table(
    "rollout_events", metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("rollout", sa.String(64), nullable=False),
    sa.Column("at", _T, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),        # start advance hold halt pause resume complete sign
    sa.Column("stage", sa.Integer),
    sa.Column("by", sa.String(16), nullable=False),            # policy | admin
    sa.Column("reason", sa.String(400)),
    sa.Column("issued", sa.BigInteger),                        # sign: the document's issued
    sa.Index("rollout_events_rollout_id", "rollout", "id"),
)
EVENT_DIGEST_INDEX = sa.Index("events_digest_device", events.c.digest, events.c.device)
ROLLOUT_ISSUED = "rollout_issued"   # meta: the last `issued` signed, over every rollout
ROLLOUT_SEQ = "rollout_seq"         # meta: rollouts started (their ids' serial)
EVENT_FIELDS = ("n", "event", "code", "detail", "version", "slot", "slots", "board", "chip", "target", "digest",
                "boots", "reset", "heap", "dropped")


def engine_url(db: str) -> str:
    """--db as the user gives it: a file path (SQLite) or postgresql://..."""
    if db.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    if db.startswith(("postgresql+psycopg://", "sqlite://")):
        return db
    if "://" in db:
        raise MpotaError(f"--db {db}: not a database this server stores to",
                         hint="give a SQLite file (fleet.sqlite) or postgresql://USER@HOST:PORT/DB")
    return "sqlite:///" + str(Path(db).expanduser().resolve())


def describe(db: str) -> str:
    """--db without a password, for messages."""
    if "://" in db and "@" in db:
        scheme, rest = db.split("://", 1)
        creds, _, host = rest.rpartition("@")
        return f"{scheme}://{creds.split(':')[0]}@{host}"
    return db


class Store:
    """The fleet's database. Thread-safe (a connection pool); every method is one transaction."""

    def __init__(self, db: str, *, create: bool = True, pool_size: int = 8):
        self.db = db
        url = engine_url(db)
        self.kind = "postgresql" if url.startswith("postgresql") else "sqlite"
        if self.kind == "sqlite":
            path = Path(url.removeprefix("sqlite:///"))
            if not create and not path.exists():
                raise MpotaError(f"no fleet database at {path}",
                                 hint="start one with `mpota fleet serve --db FILE`, or register a device into it")
            if not path.parent.is_dir():
                raise MpotaError(f"--db {db}: directory {path.parent} does not exist", hint="create it first")
            self.engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                                           pool_size=pool_size, max_overflow=pool_size)
            sa_event.listen(self.engine, "connect", _sqlite_connect)
            sa_event.listen(self.engine, "begin", _sqlite_begin)
        else:
            self.engine = sa.create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        self._lock = threading.Lock()
        try:
            self._init_schema()
        except sa.exc.OperationalError as e:
            raise MpotaError(f"cannot open the fleet database {describe(db)}: {_first_line(e)}",
                             hint="check the path or URL, that PostgreSQL runs and that the user may create "
                                  "tables") from None

    def close(self):
        self.engine.dispose()

    # ---- transactions ---------------------------------------------------------------------
    @contextmanager
    def _write(self):
        # SQLite has one writer at a time; its busy handler waits by sleeping (up to 100 ms a
        # try), so this process's writers queue on a lock instead and SQLite never has to wait
        # for one of ours
        with self._lock if self.kind == "sqlite" else _NO_LOCK:
            with self.engine.connect() as conn:
                conn = conn.execution_options(mpota_write=True)
                with conn.begin():
                    yield conn

    @contextmanager
    def _read(self):
        with self.engine.connect() as conn:
            with conn.begin():
                yield conn

    def _init_schema(self):
        with self._write() as c:
            if self.kind == "postgresql":  # two processes starting at once: one creates the tables
                c.execute(sa.text("SELECT pg_advisory_xact_lock(84700001)"))
            metadata.create_all(c, checkfirst=True)
            # added with rollouts: a database made before gets the index too (create_all adds
            # missing tables, not indexes of existing ones)
            EVENT_DIGEST_INDEX.create(c, checkfirst=True)
            v = c.execute(sa.select(meta.c.value).where(meta.c.key == "schema")).scalar()
            if v is None:
                c.execute(meta.insert().values(key="schema", value=str(SCHEMA_VERSION)))
            elif int(v) != SCHEMA_VERSION:
                raise MpotaError(f"the fleet database has schema {v}; this mpota uses {SCHEMA_VERSION}",
                                 hint="use the mpota version that made it, or a new database")

    # ---- registration -------------------------------------------------------------------------
    def register(self, device_id: str, secret_hex: str, *, board=None, interval_s=None, cohort=None,
                 now: float | None = None) -> bool:
        """Register a device or rotate its secret (and set board, interval, cohort if given).
        True if it is new. Reports already received (and inventory from logs) are kept."""
        now = time.time() if now is None else now
        with self._write() as c:
            row = c.execute(sa.select(devices).where(devices.c.id == device_id).with_for_update()).mappings().first()
            if row is None:
                c.execute(devices.insert().values(**inventory.new_device(
                    device_id, secret_hex, now, board=board, interval_s=interval_s, cohort=cohort)))
                return True
            changes = {"secret": secret_hex, "registered_at": row["registered_at"] or now}
            if board is not None and row["board"] is None:
                changes["board"] = board
            if cohort is not None:
                changes["cohort"] = cohort
            if interval_s is not None:
                changes["interval_s"] = int(interval_s)
                if row["last_seen"] is not None:
                    changes["silent_at"] = row["last_seen"] + inventory.silent_after(interval_s)
            c.execute(devices.update().where(devices.c.id == device_id).values(**changes))
            return row["secret"] is None

    def register_many(self, devices_: list[tuple[str, str]], *, interval_s=None, cohort=None, now=None) -> int:
        """Register new devices [(id, secret hex)] in one transaction (provisioning a batch, the
        load generator). Ids already registered are an error (IntegrityError): use register()."""
        now = time.time() if now is None else now
        with self._write() as c:
            for i in range(0, len(devices_), 1000):
                c.execute(devices.insert(), [inventory.new_device(d, s, now, interval_s=interval_s, cohort=cohort)
                                             for d, s in devices_[i:i + 1000]])
        return len(devices_)

    def unregister(self, device_id: str, *, forget: bool = False) -> bool:
        """Remove a device's registration (it can report no more). With forget, its inventory and
        history go too; without, they stay (for the record), as a device known from logs."""
        with self._write() as c:
            if forget:
                c.execute(events.delete().where(events.c.device == device_id))
                c.execute(attempts.delete().where(attempts.c.device == device_id))
                return c.execute(devices.delete().where(devices.c.id == device_id)).rowcount > 0
            return c.execute(devices.update().where(devices.c.id == device_id)
                             .values(secret=None)).rowcount > 0

    def secret(self, device_id: str) -> str | None:
        with self._read() as c:
            return c.execute(sa.select(devices.c.secret).where(devices.c.id == device_id)).scalar()

    # ---- reports --------------------------------------------------------------------------------
    def ingest(self, batch: Batch, secret_hex: str, now: float | None = None) -> tuple[int, int, int]:
        """Commit a batch. Returns (ack, stored, duplicates). Refusal('replay') when none of its
        reports is newer than the highest stored (its .ack says up to where); 'unknown-device'
        when the device is (no longer) registered with that secret."""
        now = time.time() if now is None else now
        with self._write() as c:
            row = c.execute(sa.select(devices).where(devices.c.id == batch.device).with_for_update()).mappings().first()
            if row is None or row["secret"] is None:
                raise Refusal("unknown-device")
            if row["secret"] != secret_hex:  # rotated between the MAC check and now
                raise Refusal("bad-signature")
            dev = dict(row)
            fresh = [r for r in batch.reports if r["n"] > dev["last_n"]]
            dups = len(batch.reports) - len(fresh)
            if not fresh:
                err = Refusal("replay")
                err.ack, err.duplicates = dev["last_n"], dups
                raise err
            wanted = {inventory.attempt_release(dev, r) for r in fresh} | {r["target"] for r in fresh}
            wanted |= {r["version"] for r in fresh} | {dev["pending"]}
            wanted.discard(None)
            have = {a["release"]: dict(a) for a in c.execute(sa.select(attempts).where(
                (attempts.c.device == batch.device) & attempts.c.release.in_(sorted(wanted)))).mappings()}
            existing, changed = set(have), {}
            for r in fresh:
                dev, a = inventory.apply(dev, have, r, now)
                if a is not None:
                    have[a["release"]] = changed[a["release"]] = a
            c.execute(events.insert(), [{**r, "device": batch.device, "source": "report", "received_at": now}
                                        for r in fresh])
            c.execute(devices.update().where(devices.c.id == batch.device)
                      .values(**{k: v for k, v in dev.items() if k != "id"}))
            self._save_attempts(c, batch.device, changed, existing)
            return fresh[-1]["n"], len(fresh), dups

    def _save_attempts(self, c, device_id, changed: dict, existing: set):
        for release, a in changed.items():
            if release in existing:
                c.execute(attempts.update().where((attempts.c.device == device_id) & (attempts.c.release == release))
                          .values(**{k: v for k, v in a.items() if k not in ("device", "release")}))
            else:
                c.execute(attempts.insert().values(**a))

    def import_announces(self, items: list[tuple[float, dict, str]], *, register_unknown: bool = True) -> dict:
        """Log lines read by logs.py: [(time, {"device", "version", "result", ...}, line)]. Each
        becomes an `announce` event (source log) once, however often the log is imported."""
        done = {"imported": 0, "duplicates": 0, "unknown": 0, "devices": set()}
        by_dev: dict = {}
        for at, rep, line in items:
            by_dev.setdefault(rep["device"], []).append((at, rep, hashlib.sha256(line.encode()).hexdigest()))
        for device_id, reps in sorted(by_dev.items()):
            with self._write() as c:
                row = c.execute(sa.select(devices).where(devices.c.id == device_id).with_for_update()).mappings().first()
                if row is None and not register_unknown:
                    done["unknown"] += len(reps)
                    continue
                dev = dict(row) if row else inventory.new_device(device_id, None, reps[0][0])
                seen = set(c.execute(sa.select(events.c.dedup).where(
                    (events.c.device == device_id) & events.c.dedup.in_([h for _, _, h in reps]))).scalars())
                rows = []
                for at, rep, h in sorted(reps, key=lambda x: x[0]):
                    if h in seen:
                        done["duplicates"] += 1
                        continue
                    seen.add(h)
                    ev = {"n": None, "event": "announce", "version": rep.get("version"), "result": rep.get("result"),
                          "source": "log", "detail": rep.get("detail"), "code": rep.get("code")}
                    dev, _ = inventory.apply(dev, {}, ev, at)
                    rows.append({**dict.fromkeys(EVENT_FIELDS), **ev, "device": device_id, "received_at": at,
                                 "dedup": h})
                if not rows:
                    continue
                c.execute(events.insert(), rows)
                if row is None:
                    c.execute(devices.insert().values(**dev))
                else:
                    c.execute(devices.update().where(devices.c.id == device_id)
                              .values(**{k: v for k, v in dev.items() if k != "id"}))
                done["imported"] += len(rows)
                done["devices"].add(device_id)
        done["devices"] = len(done["devices"])
        return done

    # ---- counters (refusals, duplicates: summed over every server process) ----------------
    def add_counts(self, counts: dict):
        if not counts:
            return
        with self._write() as c:
            for name, k in sorted(counts.items()):
                n = c.execute(counters.update().where(counters.c.name == name)
                              .values(n=counters.c.n + k)).rowcount
                if not n:
                    try:
                        with c.begin_nested():
                            c.execute(counters.insert().values(name=name, n=k))
                    except sa.exc.IntegrityError:  # another process inserted it just now
                        c.execute(counters.update().where(counters.c.name == name).values(n=counters.c.n + k))

    def counts(self) -> dict:
        with self._read() as c:
            return {r.name: r.n for r in c.execute(sa.select(counters).order_by(counters.c.name))}

    # ---- queries ----------------------------------------------------------------------------
    def devices(self, *, board=None, chip=None, version=None, status=None, cohort=None, seen_before=None,
                seen_after=None, silent=None, now=None, limit=1000, offset=0) -> tuple[int, list[dict]]:
        """(number matching, the rows from offset, at most limit), ordered by id."""
        now = time.time() if now is None else now
        d = devices.c
        cond = []
        for col, v in ((d.board, board), (d.chip, chip), (d.version, version), (d.cohort, cohort)):
            if v is not None:
                cond.append(col == v)
        if status == "failed-silent":
            cond += [d.status == "pending-confirm", d.silent_at < now]
        elif status == "pending-confirm":
            cond += [d.status == "pending-confirm", d.silent_at >= now]
        elif status is not None:
            cond.append(d.status == status)
        if seen_before is not None:
            cond.append(d.last_seen < seen_before)
        if seen_after is not None:
            cond.append(d.last_seen >= seen_after)
        if silent is True:
            cond.append(d.silent_at < now)
        elif silent is False:
            cond.append(sa.or_(d.silent_at.is_(None), d.silent_at >= now))
        where = sa.and_(sa.true(), *cond)
        with self._read() as c:
            total = c.execute(sa.select(sa.func.count()).select_from(devices).where(where)).scalar()
            rows = c.execute(sa.select(devices).where(where).order_by(d.id).limit(limit).offset(offset)).mappings()
            return total, [dict(r) for r in rows]

    def device(self, device_id: str) -> dict | None:
        with self._read() as c:
            r = c.execute(sa.select(devices).where(devices.c.id == device_id)).mappings().first()
            return dict(r) if r else None

    def events(self, *, device=None, event=None, before_id=None, since=None, limit=100) -> list[dict]:
        """Newest first."""
        e = events.c
        cond = [sa.true()]
        if device is not None:
            cond.append(e.device == device)
        if event is not None:
            cond.append(e.event.in_(event) if isinstance(event, (list, tuple)) else e.event == event)
        if before_id is not None:
            cond.append(e.id < before_id)
        if since is not None:
            cond.append(e.received_at >= since)
        with self._read() as c:
            rows = c.execute(sa.select(events).where(*cond).order_by(e.id.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows]

    def attempts(self, *, device=None, release=None) -> list[dict]:
        a = attempts.c
        cond = [sa.true()]
        if device is not None:
            cond.append(a.device == device)
        if release is not None:
            cond.append(a.release == release)
        with self._read() as c:
            return [dict(r) for r in c.execute(sa.select(attempts).where(*cond)
                                               .order_by(a.release, a.device)).mappings()]

    def fleet_rows(self) -> list[dict]:
        """Every device's few fields the statistics need (id, version, board, chip, cohort,
        status, pending, silent_at, heap, reset, last_seen)."""
        d = devices.c
        cols = [d.id, d.version, d.board, d.chip, d.cohort, d.status, d.pending, d.silent_at, d.heap, d.reset,
                d.last_seen, d.secret.isnot(None).label("registered")]
        with self._read() as c:
            return [dict(r) for r in c.execute(sa.select(*cols)).mappings()]

    def activity(self, since: float) -> list[dict]:
        """Per device, over the events received since `since`: boots (lowest, highest), number of
        rollbacks, of boot reports after a watchdog or hard reset, of reports. For boot loops."""
        e = events.c
        crash = sa.case((e.reset.in_((2, 3)) & (e.event == "boot"), 1), else_=0)
        rolled = sa.case((e.event == "rolled-back", 1), else_=0)
        q = (sa.select(e.device, sa.func.min(e.boots).label("boots_min"), sa.func.max(e.boots).label("boots_max"),
                       sa.func.sum(rolled).label("rollbacks"), sa.func.sum(crash).label("crash_resets"),
                       sa.func.count().label("reports"), sa.func.max(e.version).label("version"))
             .where(e.received_at >= since, e.source == "report").group_by(e.device))
        with self._read() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    # ---- rollouts (policy: rollout.py; acting on it: rollouts.py) ---------------------------
    def rollout_inputs(self, version: str, digest: str) -> tuple[list[dict], list[dict]]:
        """What the policy needs for one release: every device (id, board, cohort, registered,
        version, pending, last_seen) and the attempts at `version` by devices that reported the
        release's envelope `digest` in some report (attempts are keyed by version; the digest
        says which release of that version a device was offered)."""
        d, a, e = devices.c, attempts.c, events.c
        cols = [d.id, d.board, d.cohort, d.version, d.pending, d.last_seen, d.silent_at,
                d.secret.isnot(None).label("registered")]
        saw = sa.select(e.device).where(e.digest == digest).distinct()
        with self._read() as c:
            devs = [dict(r) for r in c.execute(sa.select(*cols)).mappings()]
            rows = [dict(r) for r in c.execute(sa.select(attempts).where(
                (a.release == version) & a.device.in_(saw)).order_by(a.device)).mappings()]
        return devs, rows

    def next_rollout_seq(self) -> int:
        with self._write() as c:
            return self._bump(c, ROLLOUT_SEQ, lambda n: n + 1)

    def _bump(self, c, key: str, f) -> int:
        row = c.execute(sa.select(meta.c.value).where(meta.c.key == key).with_for_update()).scalar()
        n = f(int(row) if row is not None else 0)
        if row is None:
            c.execute(meta.insert().values(key=key, value=str(n)))
        else:
            c.execute(meta.update().where(meta.c.key == key).values(value=str(n)))
        return n

    def create_rollout(self, row: dict, sign) -> dict:
        """Insert a rollout, sign its first document in the same transaction: sign(row,
        last_issued) returns (issued, body) after writing the file (rollouts.py)."""
        with self._write() as c:
            if c.execute(sa.select(rollouts.c.id).where(rollouts.c.id == row["id"])).first() is not None:
                raise MpotaError(f"a rollout {row['id']} exists already", hint="give another --id")
            busy = c.execute(sa.select(rollouts.c.id).where(
                (rollouts.c.path == row["path"]) & rollouts.c.state.in_(("running", "paused")))).scalar()
            if busy is not None:
                raise MpotaError(f"rollout {busy} is still active on {row['path']}",
                                 hint=f"halt it first: mpota fleet rollout halt {busy} --reason ...")
            row = {**row, "rev": 1}
            last = int(c.execute(sa.select(meta.c.value).where(meta.c.key == ROLLOUT_ISSUED)
                                 .with_for_update()).scalar() or 0)
            issued, body = sign(row, last)
            row.update(document=body, issued=issued)
            self._bump(c, ROLLOUT_ISSUED, lambda n: max(n, issued))
            c.execute(rollouts.insert().values(**row))
            c.execute(rollout_events.insert(), [
                {"rollout": row["id"], "at": row["created_at"], "action": "start", "stage": 0, "by": "admin",
                 "reason": None, "issued": None},
                {"rollout": row["id"], "at": row["created_at"], "action": "sign", "stage": 0, "by": "policy",
                 "reason": "first document", "issued": issued}])
            return row

    def change_rollout(self, rollout_id: str, rev: int | None, change) -> dict | None:
        """One change of a rollout, atomic: change(row, last_issued) returns None (nothing to
        do) or (changes, events, issued or None), having signed and written the document if it
        did. Skipped (None) when rev is given and the row moved on since it was read: whoever
        changed it decides with what it saw. Returns the new row."""
        with self._write() as c:
            row = c.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id).with_for_update()).mappings().first()
            if row is None:
                raise MpotaError(f"no rollout {rollout_id}", hint="`mpota fleet rollout status` lists them")
            if rev is not None and row["rev"] != rev:
                return None
            last = int(c.execute(sa.select(meta.c.value).where(meta.c.key == ROLLOUT_ISSUED)
                                 .with_for_update()).scalar() or 0)
            done = change(dict(row), last)
            if done is None:
                return None
            changes, evs, issued = done
            if issued is not None:
                self._bump(c, ROLLOUT_ISSUED, lambda n: max(n, issued))
            changes = {**changes, "rev": row["rev"] + 1}
            c.execute(rollouts.update().where(rollouts.c.id == rollout_id).values(**changes))
            if evs:
                c.execute(rollout_events.insert(), [{"rollout": rollout_id, "stage": None, "reason": None,
                                                     "issued": None, **e} for e in evs])
            return {**dict(row), **changes}

    def rollouts(self, *, states=None) -> list[dict]:
        """Newest first."""
        r = rollouts.c
        q = sa.select(rollouts).order_by(r.created_at.desc(), r.id.desc())
        if states:
            q = q.where(r.state.in_(states))
        with self._read() as c:
            return [dict(x) for x in c.execute(q).mappings()]

    def rollout(self, rollout_id: str) -> dict | None:
        with self._read() as c:
            r = c.execute(sa.select(rollouts).where(rollouts.c.id == rollout_id)).mappings().first()
            return dict(r) if r else None

    def rollout_history(self, rollout_id: str, limit: int = 200) -> list[dict]:
        """Newest first."""
        e = rollout_events.c
        with self._read() as c:
            return [dict(x) for x in c.execute(sa.select(rollout_events).where(e.rollout == rollout_id)
                                               .order_by(e.id.desc()).limit(limit)).mappings()]

    def claim(self, name: str, holder: str, ttl: float, now: float | None = None) -> bool:
        """A lease in meta: True if `holder` holds `name` for the next ttl seconds (it was free,
        expired or already its own). With several server processes on one PostgreSQL, only the
        holder evaluates the rollouts."""
        now = time.time() if now is None else now
        key = "lease:" + name
        with self._write() as c:
            cur = c.execute(sa.select(meta.c.value).where(meta.c.key == key).with_for_update()).scalar()
            if cur is not None:
                who, _, until = cur.rpartition(" ")
                if who != holder and float(until) > now:
                    return False
            value = f"{holder} {now + ttl:.3f}"
            if cur is None:
                try:
                    with c.begin_nested():
                        c.execute(meta.insert().values(key=key, value=value))
                except sa.exc.IntegrityError:  # another process claimed it just now
                    return False
            else:
                c.execute(meta.update().where(meta.c.key == key).values(value=value))
            return True

    def timeline(self, release: str) -> list[dict]:
        """The attempts at one release with their times (for the progress chart)."""
        return self.attempts(release=release)


_NO_LOCK = nullcontext()


def _first_line(e: Exception) -> str:
    return str(getattr(e, "orig", None) or e).strip().splitlines()[0]


def _sqlite_connect(dbapi_conn, _record):
    dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" below says how each transaction begins
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")     # readers do not wait for the writer
    cur.execute("PRAGMA synchronous=FULL")     # an acknowledged report survives a power cut too
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn):
    # a write transaction takes the write lock at BEGIN: no two read-then-write races
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("mpota_write") else "BEGIN")
