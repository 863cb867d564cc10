"""A throwaway PostgreSQL server for tests, benchmarks and demos: initdb on a fresh directory,
pg_ctl start on a free loopback port, trust authentication, removed by stop().

The binaries come from $MPOTA_PG_BIN, else the newest /usr/lib/postgresql/*/bin (Debian's
`postgresql` package), else PATH. PostgreSQL refuses to run as root: as root, the cluster
belongs to and runs as the user `nobody` (its directory is made for it under /tmp).
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .. import MpotaError


def find_bindir() -> Path | None:
    env = os.environ.get("MPOTA_PG_BIN")
    if env:
        return Path(env) if (Path(env) / "initdb").exists() else None
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def unavailable_reason() -> str | None:
    """Why no cluster can be started here (None: it can)."""
    if find_bindir() is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql, "
                "or set MPOTA_PG_BIN to their directory")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "running as root and there is no user `nobody` to run PostgreSQL as"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """start() a server; .url is postgresql://mpota@127.0.0.1:PORT/DBNAME; new_database() gives
    each test its own database on it; stop() ends it and removes its files."""

    def __init__(self, *, durable: bool = True, bindir: Path | None = None):
        self.bindir = bindir or find_bindir()
        if self.bindir is None:
            raise MpotaError(unavailable_reason() or "no PostgreSQL")
        self.durable = durable
        self.port = None
        self.dir = None
        self._user = None

    def _run(self, *args, check=True, **kw):
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        if self._user is not None:
            kw["user"], kw["group"] = self._user.pw_uid, self._user.pw_gid
            kw["cwd"] = self.dir
        r = subprocess.run([str(a) for a in args], **kw)
        if check and r.returncode:
            raise MpotaError(f"{Path(str(args[0])).name} failed: {(r.stderr or r.stdout).strip()[-800:]}")
        return r

    def start(self) -> "Cluster":
        self.dir = Path(tempfile.mkdtemp(prefix="mpota-pg-"))
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("nobody")
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        data = self.dir / "data"
        self._run(self.bindir / "initdb", "-D", data, "-U", "mpota", "--auth=trust", "-E", "UTF8",
                  "--no-locale", *([] if self.durable else ["--no-sync"]))
        conf = ["listen_addresses = '127.0.0.1'", "unix_socket_directories = ''", "max_connections = 200",
                "shared_buffers = 64MB", "log_min_messages = warning"]
        if not self.durable:  # tests: a crash of PostgreSQL itself is not what they are about
            conf += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(data / "postgresql.conf", "a") as f:
            f.write("\n".join(conf) + "\n")
        for attempt in range(5):
            self.port = free_port()
            r = self._run(self.bindir / "pg_ctl", "-D", data, "-l", self.dir / "log", "-w", "-t", "60",
                          "-o", f"-p {self.port}", "start", check=False)
            if r.returncode == 0:
                break
            if attempt == 4:
                log = (self.dir / "log").read_text(errors="replace")[-800:] if (self.dir / "log").exists() else ""
                self.stop()
                raise MpotaError(f"PostgreSQL did not start: {r.stderr.strip()} {log}")
        return self

    @property
    def url(self) -> str:
        return self.db_url("postgres")

    def db_url(self, name: str) -> str:
        return f"postgresql://mpota@127.0.0.1:{self.port}/{name}"

    def new_database(self, name: str) -> str:
        import psycopg
        with psycopg.connect(self.url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
            c.execute(f'CREATE DATABASE "{name}"')
        return self.db_url(name)

    def stop(self):
        if self.dir is None:
            return
        if self.port is not None and (self.dir / "data" / "postmaster.pid").exists():
            self._run(self.bindir / "pg_ctl", "-D", self.dir / "data", "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def wait_for(url: str, timeout: float = 30.0):
    import psycopg
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
