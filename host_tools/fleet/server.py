"""Running the fleet server: uvicorn on a socket we bind ourselves (so --port 0 works and the
address is known before the first request), the admin token file, and two helpers for tests
and demos: start_in_thread() (in-process) and start_subprocess() (`mpota fleet serve` as a child
process, whose first line of output says where it listens).
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import MpotaError
from . import protocol
from .storage import Store

FIRST_LINE = "mpota fleet: serving on "
DEFAULT_PORT = 8470


def default_token_file(db: str) -> Path | None:
    if "://" in db:
        return None
    return Path(db + ".token")


def load_token(path: Path, *, create: bool = True) -> str:
    """The admin token in `path`; a new random one is written there (mode 0600) if it is absent."""
    path = Path(path)
    if path.exists():
        token = path.read_text().strip()
        if len(token) < 16:
            raise MpotaError(f"the admin token in {path} is shorter than 16 characters",
                             hint="delete the file to have a new random token written")
        return token
    if not create:
        raise MpotaError(f"no admin token file {path}", hint="`mpota fleet serve` writes one when it starts")
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise MpotaError(f"cannot listen on {host}:{port}: {e.strerror}",
                         hint="another server has that port: give --port N (0 picks a free one)") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def _uvicorn_server(app, *, access_log: bool, on_started=None):
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if on_started is not None and not self.should_exit:
                on_started()

    config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log,
                            lifespan="on", timeout_keep_alive=15, server_header=False,
                            h11_max_incomplete_event_size=16 * 1024)
    # uvicorn's own start-up lines are noise next to ours; its access log stays when asked for
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    return Server(config)


def serve(db: str, host: str, port: int, token: str, *, access_log: bool = True,
          body_timeout: float = protocol.BODY_TIMEOUT_S, announce=None, rollout_key=None,
          rollout_interval: float | None = None) -> None:
    """Serve until SIGINT/SIGTERM (graceful: requests in flight finish, counters are saved).
    With rollout_key (the rollout role's private key) the rollouts advance and halt themselves."""
    from .web import ROLLOUT_INTERVAL_S, create_app
    store = Store(db)
    sock = bind(host, port)
    try:
        app = create_app(store, token, body_timeout=body_timeout, rollout_key=rollout_key,
                         rollout_interval=rollout_interval or ROLLOUT_INTERVAL_S)
        server = _uvicorn_server(app, access_log=access_log,
                                 on_started=(lambda: announce(url_of(sock), store)) if announce else None)
        server.run(sockets=[sock])
    finally:
        sock.close()
        store.close()


class InProcess:
    """A fleet server running in a thread of this process: .url, .token, .store, .stop()."""

    def __init__(self, db: str, *, token: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 body_timeout: float = protocol.BODY_TIMEOUT_S, store: Store | None = None, rollout_key=None,
                 rollout_interval: float | None = None):
        from .web import ROLLOUT_INTERVAL_S, create_app
        self.store = store or Store(db)
        self.token = token or secrets.token_urlsafe(24)
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.app = create_app(self.store, self.token, body_timeout=body_timeout, rollout_key=rollout_key,
                              rollout_interval=rollout_interval or ROLLOUT_INTERVAL_S)
        started = threading.Event()
        self.server = _uvicorn_server(self.app, access_log=False, on_started=started.set)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="mpota-fleet")
        self.thread.start()
        if not started.wait(30):
            raise MpotaError("the fleet server did not start within 30 s")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_in_thread(db: str, **kw) -> InProcess:
    return InProcess(db, **kw)


class Child:
    """`mpota fleet serve` in a child process: .url (from its first line), .token, .proc;
    stop() (SIGTERM: a graceful end) or kill() (SIGKILL: as a crash or a power cut would)."""

    def __init__(self, db: str, token_file: Path, *, port: int = 0, host: str = "127.0.0.1", args=(),
                 log: Path | None = None, env=None, timeout: float = 60.0):
        self.token_file = Path(token_file)
        cmd = [sys.executable, "-m", "mpota", "fleet", "serve", "--db", db, "--host", host, "--port", str(port),
               "--token-file", str(token_file), "--quiet", *args]
        self._log = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=env, text=True)
        line = self._first_line(timeout)
        m = re.match(re.escape(FIRST_LINE) + r"(\S+)", line)
        if not m:
            self.kill()
            raise MpotaError(f"mpota fleet serve did not start: {line.strip() or 'no output'}"
                             + (f" (see {log})" if log else ""))
        self.url = m.group(1)
        self.token = load_token(self.token_file, create=False)
        threading.Thread(target=self._drain, daemon=True).start()

    def _first_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                return self.proc.stdout.readline()
            if self.proc.poll() is not None:
                return ""
        return ""

    def _drain(self):
        for _ in self.proc.stdout:
            pass

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


def start_subprocess(db: str, token_file: Path, **kw) -> Child:
    return Child(db, token_file, **kw)
