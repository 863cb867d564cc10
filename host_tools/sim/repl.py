"""The simulated device's REPL on a loopback TCP port, for mpremote (and `mpota deploy`):

    mpota sim repl dev1 --port 5555
    mpremote connect socket://127.0.0.1:5555 resume fs ls

Each TCP connection gets a fresh `micropython` REPL (the unix port) on a pseudo-terminal, run
as the device runs its firmware: in the device's fs/ directory, with its flash, its platform
modules (`esp32`, `machine`) and the slot the bootloader last chose (device_env). Bytes are
relayed both ways unchanged, so mpremote's raw REPL and raw-paste protocols reach the real
MicroPython REPL.

The unix port has no soft reset: Ctrl-D in the raw REPL ends the process (exit 0). The bridge
turns that into what a board does (prints "soft reboot", starts a new REPL, re-enters the raw
REPL), so mpremote works with or without `resume`; `mpota deploy` uses `resume`, which skips the
soft reset and is the same on a board. machine.reset() (exit 100) or a crash ends the session,
as a board that resets drops its USB serial port; the next connection starts a new REPL. A
session also ends when the client disconnects (the process is stopped) or after `idle_s`
without traffic.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time

from .device import DeviceBusy, SimDevice, in_use, load
from .runner import SimError, device_env, ensure_running, micropython_binary

EXIT_NAMES = {0: "exit (Ctrl-D: the unix port's soft reset ends the process)",
              100: "machine.reset()", 101: "power loss", 102: "panic"}


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    # The unix port's REPL runs anything as the user who started it (os.system is one import
    # away): it is only ever served on loopback.
    import ipaddress
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SimError(f"refusing to serve a REPL on {host}: it runs any code on this machine",
                       hint="use a loopback address: --host 127.0.0.1")
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind((host, port))
    except OSError as e:
        srv.close()
        raise SimError(f"cannot listen on {host}:{port}: {e.strerror}",
                       hint="pick another --port (0 chooses a free one)") from None
    srv.listen(1)
    return srv


class _Repl:
    """One micropython REPL process on a pseudo-terminal."""

    def __init__(self, cmd, cwd, env):
        import pty
        import tty
        self.master, slave = pty.openpty()
        tty.setraw(slave)  # no line discipline: Ctrl-C, Ctrl-D and \r reach MicroPython as bytes
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                     close_fds=True, start_new_session=True)
        os.close(slave)

    def read(self) -> bytes:
        try:
            return os.read(self.master, 4096)
        except OSError:  # EIO: the process closed the terminal (it exited)
            return b""

    def read_until(self, ending: bytes, timeout: float = 5.0) -> bytes:
        out, deadline = b"", time.monotonic() + timeout
        while not out.endswith(ending) and time.monotonic() < deadline:
            if _pending(self.master, 0.1):
                data = self.read()
                if not data:
                    break
                out += data
        return out

    def stop(self, grace: float = 0) -> int | None:
        """Ends the process (waiting `grace` seconds for it to exit by itself); returns its exit
        code, or None if it had to be stopped. Idempotent."""
        if self.master < 0:
            return self.proc.returncode
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.stopped = True
        os.close(self.master)
        self.master = -1
        return None if getattr(self, "stopped", False) else self.proc.returncode


def session(dev: SimDevice, conn: socket.socket, heap: str | None = None, idle_s: float = 600,
            log=print) -> int | None:
    """Relay one connection to a new micropython REPL until either side ends it; returns the
    process's exit code (None when it was stopped because the client left).

    A soft reset (Ctrl-D; the unix port exits 0) is emulated as a board does it: "soft reboot",
    a new process, and back into the raw REPL if the client had entered it. So mpremote works
    without `resume` too. machine.reset() (exit 100) and crashes end the session."""
    sel = ensure_running(dev)
    env = device_env(dev, MPOTA_RUNNING=sel["slot"], MPOTA_BEHAVIOR=sel.get("behavior"),
                     MPOTA_VERSION=sel.get("version"))
    cmd = [micropython_binary(), "-X", f"heapsize={heap or dev.heap}"]
    repl = _Repl(cmd, dev.fs, env)
    raw = False      # has the client entered the raw REPL (\r Ctrl-A) and not left it (\r Ctrl-B)?
    tail = b""
    rc = None
    last = time.monotonic()
    try:
        while True:
            ready, _, _ = select.select([conn, repl.master], [], [], 0.5)
            if not ready:
                if time.monotonic() - last > idle_s:
                    log(f"sim repl: no traffic for {idle_s:.0f} s, closing the session")
                    break
                if repl.proc.poll() is None or _pending(repl.master):
                    continue
            last = time.monotonic()
            if conn in ready:
                data = conn.recv(4096)
                if not data:
                    break  # the client left
                seen = tail + data
                i, j = seen.rfind(b"\r\x01"), seen.rfind(b"\r\x02")
                if i != j:
                    raw = i > j
                tail = seen[-1:]
                os.write(repl.master, data)
            if repl.master in ready or repl.proc.poll() is not None:
                data = repl.read()
                if data:
                    conn.sendall(data)
                    continue
                rc = repl.stop(grace=3)  # it closed the terminal: it is exiting
                if rc != 0:
                    break
                log("sim repl: soft reset (the unix port exited; starting a new REPL)")
                repl = _Repl(cmd, dev.fs, env)
                banner = repl.read_until(b">>> ")
                if raw:
                    conn.sendall(b"soft reboot\r\n")
                    os.write(repl.master, b"\r\x01")
                else:
                    conn.sendall(b"MPY: soft reboot\r\n" + banner)
                rc = None
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        if rc is None:
            rc = repl.stop()
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()
    return rc


def _pending(fd, timeout: float = 0) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


def serve(dev: SimDevice, srv: socket.socket, heap: str | None = None, once: bool = False,
          idle_s: float = 600, log=print) -> None:
    """Accept connections one after another (a serial port has one user at a time). The device
    is held (device.in_use) during each session, not between them: `mpota sim run` may boot it
    while no client is connected, and each session starts from what the device is then."""
    with in_use(dev, "mpota sim repl"):
        ensure_running(dev)
    while True:
        conn, peer = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            with in_use(dev, f"an mpota sim repl session from {peer[0]}:{peer[1]}"):
                dev = load(dev.name, dev.path.parent)
                log(f"sim repl: {peer[0]}:{peer[1]} connected; micropython REPL in {dev.fs}/ "
                    f"(running {dev.running.get('slot', '?')} {dev.running.get('version', '')})")
                rc = session(dev, conn, heap, idle_s, log)
        except DeviceBusy as e:
            log(f"sim repl: {peer[0]}:{peer[1]} refused: {e}")
            try:
                conn.sendall(f"mpota sim repl: {e}\r\n  hint: {e.hint}\r\n".encode())
            except OSError:
                pass
            conn.close()
            continue
        how = "client disconnected" if rc is None else f"micropython ended: {EXIT_NAMES.get(rc, f'exit {rc}')}"
        log(f"sim repl: session closed ({how})")
        if once:
            return
