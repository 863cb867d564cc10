"""The simulated device as a board with its serial console on a loopback TCP port, for mpremote,
`mpota deploy`, `mpota push` and the target tests:

    mpota sim repl dev1 --port 5555
    mpremote connect socket://127.0.0.1:5555 resume fs ls

The board runs for as long as the command does, as a board on a USB-UART bridge would: powered
on, its bootloader chooses a slot, MicroPython runs boot.py and main.py, then its REPL. Resets
(machine.reset(), a panic, a watchdog that is not fed) run the bootloader again, and boot.py
and main.py again; machine.soft_reset() and deep sleep behave as in `mpota sim run` (see
runner.py and docs/simulator.md). The client's connection survives them, as a UART does.

The firmware is `micropython -m firmware` on a pseudo-terminal (boot.py, main.py); when it
returns, or raises, the board is at its REPL: a plain `micropython` REPL on the same terminal
and environment takes over (so machine.reset() typed there still resets the board). Bytes are
relayed both ways unchanged, so mpremote's raw REPL and raw-paste protocols reach the real
MicroPython REPL. Two things the unix port does differently from a board are bridged: Ctrl-C
while a script runs reaches the unix port as a byte, not a signal, so it is turned into SIGINT
(a board's UART interrupt does that); and Ctrl-D at the REPL ends the unix port, so it is turned
into a soft reset (in the raw REPL: a new REPL, back in raw mode, as mpremote expects).
Nobody connected: the output goes to the log.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time

from .device import SimDevice, in_use
from .runner import (DEEPSLEEP_RESET, HARD_RESET, PWRON_RESET, SOFT_RESET_CAUSE, WDT_RESET, SimError,
                     bootloader, firmware_env, micropython_binary, watchdog_expired)

# micropython exit code -> (what happened, how the board starts next, machine.reset_cause() then)
_EXITS = {0: ("soft reset (Ctrl-D)", "soft-reset", SOFT_RESET_CAUSE),
          100: ("machine.reset()", "reset", HARD_RESET), 102: ("panic", "reset", HARD_RESET),
          103: ("soft reset", "soft-reset", SOFT_RESET_CAUSE),
          104: ("deep sleep", "deep-sleep wake", DEEPSLEEP_RESET)}
AT_REPL = (0, 105)  # how the firmware process ends when main.py returned or raised


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


class Board:
    """The simulated device running as a board does; its console is a pseudo-terminal."""

    def __init__(self, dev: SimDevice, heap: str | None = None, log=print):
        self.dev, self.heap, self.log = dev, heap or dev.heap, log
        self.wdt = (dev.path / "wdt").resolve()
        self.proc: subprocess.Popen | None = None
        self.master = -1
        self.sel: dict = {}
        self.rtc_slot: str | None = None
        self.in_script = False   # boot.py/main.py run (Ctrl-C must interrupt them)
        self.in_script_process = False
        self.cause = PWRON_RESET
        self.raw = False         # has the client entered the raw REPL (\r Ctrl-A) and not left it?
        self._tail = b""
        self._tail_in = b""
        self.held = b""          # typed after an interrupt, while main.py ends and the REPL starts
        self.held_since = 0.0
        self.out = b""           # what the console printed while nobody was connected

    def start(self, how: str = "power-on", cause: int = PWRON_RESET) -> None:
        if how != "soft-reset":
            self.wdt.unlink(missing_ok=True)
            sel = bootloader(self.dev, wake_slot=self.rtc_slot if how == "deep-sleep wake" else None)
            if "error" in sel:
                raise SimError(f"the device is bricked: {sel['error']}")
            self.sel, self.rtc_slot = sel, sel["slot"]
            self.dev.running = sel
            self.dev.save()
            self.log(f"sim repl: {how}: bootloader: {sel['slot']} firmware {sel['version']}")
        # boot.py and main.py, except after a soft reset in the raw REPL (mp_task skips main.py)
        self._spawn(script=not (how == "soft-reset" and self.raw), cause=cause)

    def _spawn(self, script: bool, cause: int) -> None:
        self.cause = cause
        cmd = [micropython_binary(), "-X", f"heapsize={self.heap}"] + (["-m", "firmware"] if script else [])
        env = firmware_env(self.dev, self.sel, MPOTA_WDT=self.wdt, MPOTA_RESET_CAUSE=cause)
        import pty
        import tty
        self.master, slave = pty.openpty()
        tty.setraw(slave)  # no line discipline: Ctrl-C, Ctrl-D and \r reach MicroPython as bytes
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=self.dev.fs, env=env,
                                     close_fds=True, start_new_session=True)
        os.close(slave)
        self.in_script = self.in_script_process = script
        if self.held and not script:
            # A board's UART holds what was typed while main.py unwound into the REPL; here the
            # REPL is a new process, so what the client sent meanwhile (mpremote's \r Ctrl-A right
            # after its Ctrl-C) is handed to it instead of being lost with the old terminal.
            self._put(self.held)
        self.held = b""

    def read(self) -> bytes:
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: the process closed the terminal (it exited)
            return b""
        seen = (self._tail + data)[-64:]
        if b">>> " in seen or b"raw REPL" in seen:
            self.in_script = False
        self._tail = seen
        return data

    def write(self, data: bytes) -> None:
        seen = self._tail_in + data
        i, j = seen.rfind(b"\r\x01"), seen.rfind(b"\r\x02")
        if i != j:
            self.raw = i > j
        self._tail_in = seen[-1:]
        if self.held_since or (self.proc is not None and self.proc.poll() is not None):
            # An interrupt is being delivered, or the process has just ended (main.py returned)
            # and the REPL that follows is not there yet: a board's UART keeps what is typed
            # meanwhile; here it goes to the next process (_spawn), not to a closed terminal.
            self.held += data
            return
        if self.in_script and b"\x03" in data and self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # a board's UART interrupt: KeyboardInterrupt
            self.held_since = time.monotonic()
            k = data.index(b"\x03") + 1
            data, self.held = data[:k], data[k:]
        self._put(data)

    def _put(self, data: bytes) -> None:
        try:
            os.write(self.master, data)
        except OSError:
            pass

    def check(self, send=None) -> None:
        """After output stopped or a timeout: a process that ended, or a watchdog that expired,
        is what the board does next."""
        if self.proc is None:
            return
        rc = self.proc.poll()
        if rc is None and self.held_since and (self.in_script is False or time.monotonic() - self.held_since > 1):
            self.held_since = 0.0  # the script caught the interrupt and went on: it gets the input
            self._put(self.held)
            self.held = b""
        if rc is None and watchdog_expired(self.wdt):
            self._stop()
            self.log("sim repl: the watchdog was not fed: reset")
            self._next("reset after the watchdog", "watchdog", WDT_RESET, send)
            return
        if rc is None:
            return
        while True:  # whatever the console still holds
            data = self.read()
            if not data:
                break
            (send or self._keep)(data)
        script = self.in_script_process
        self._stop()
        if script and rc in AT_REPL:
            self._spawn(script=False, cause=self.cause)  # main.py returned or raised: the REPL
            return
        what, how, cause = _EXITS.get(rc, (f"micropython ended (exit {rc})", "reset", HARD_RESET))
        self.log(f"sim repl: {what}")
        self._next(what, how, cause, send)

    def _keep(self, data: bytes) -> None:
        self.out = (self.out + data)[-65536:]

    def _next(self, what, how, cause, send) -> None:
        if how == "soft-reset" and self.raw:
            self.start(how, cause)
            deadline = time.monotonic() + 5
            banner = b""
            while not banner.endswith(b">>> ") and time.monotonic() < deadline:
                r, _, _ = select.select([self.master], [], [], 0.1)
                if r:
                    banner += self.read()
            os.write(self.master, b"\r\x01")
            (send or self._keep)(b"soft reboot\r\n")
            return
        if how == "soft-reset":
            (send or self._keep)(b"MPY: soft reboot\r\n")
        self.start(how, cause)

    def _stop(self) -> None:
        self.held_since = 0.0
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.master >= 0:
            os.close(self.master)
        self.master = -1
        self.proc = None

    def stop(self) -> None:
        self._stop()


def serve(dev: SimDevice, srv: socket.socket, heap: str | None = None, once: bool = False,
          idle_s: float = 600, log=print) -> None:
    """Run the board and relay its console to one client at a time (a serial port has one
    user); with `once`, stop when the first client leaves. The board runs for as long as this
    does, so the device is held (device.in_use) all that time: `mpota sim run` on it meanwhile
    is refused instead of writing the same flash."""
    if dev.hardware.get("fs", "host") != "host":
        raise SimError(f"{dev.name}'s filesystem is in its flash ({dev.hardware['fs']}): the console serves "
                       "devices whose filesystem is a host directory",
                       hint="create one without --fs for mpremote and mpota deploy; `mpota sim run` runs this one")
    with in_use(dev, "mpota sim repl"):
        _serve(dev, srv, heap, once, idle_s, log)


def _serve(dev, srv, heap, once, idle_s, log) -> None:
    board = Board(dev, heap, log)
    board.start()
    conn = None
    last = time.monotonic()

    def send(data: bytes) -> None:
        nonlocal conn
        if conn is None:
            board._keep(data)
            return
        try:
            conn.sendall(data)
        except OSError:
            conn.close()
            conn = None

    try:
        while True:
            fds = [srv, board.master] + ([conn] if conn else [])
            ready, _, _ = select.select([f for f in fds if f is not None and f != -1], [], [], 0.2)
            if srv in ready:
                c, peer = srv.accept()
                if conn is not None:
                    c.sendall(b"mpota sim repl: the console is in use by another client\r\n")
                    c.close()
                else:
                    conn = c
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    last = time.monotonic()
                    log(f"sim repl: {peer[0]}:{peer[1]} connected to {dev.name}'s console "
                        f"(running {dev.running.get('slot', '?')} {dev.running.get('version', '')})")
                    board.out = b""
            if conn is not None and conn in ready:
                data = conn.recv(4096)
                if not data:
                    log("sim repl: client disconnected")
                    conn.close()
                    conn = None
                    if once:
                        return
                else:
                    last = time.monotonic()
                    board.write(data)
            if board.master in ready:
                data = board.read()
                if data:
                    last = time.monotonic()
                    send(data)
            board.check(send if conn else None)
            if conn is not None and time.monotonic() - last > idle_s:
                log(f"sim repl: no traffic for {idle_s:.0f} s, closing the session")
                conn.close()
                conn = None
                if once:
                    return
    finally:
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        board.stop()
