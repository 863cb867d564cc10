"""Real `mpota fleet serve` processes: killed with SIGKILL in the middle of a stream of reports,
no acknowledged report is lost and the clients' resends fill in the rest exactly once; two
server processes on one PostgreSQL take reports for the same devices at once (as behind a load
balancer) and store each exactly once. Clients are CPython Reporters with real HMAC."""
from __future__ import annotations

import random
import socket
import threading
import time

from fleet_util import new_secret, rep
from mpota.fleet import protocol
from mpota.fleet.client import Reporter
from mpota.fleet.server import Child
from mpota.fleet.storage import Store

DEVICES = 4
REPORTS = 120  # per device


class Sender(threading.Thread):
    """One device: REPORTS reports, each flushed as soon as made (so many small requests are in
    flight), resent on any connection error until acknowledged; the target URL may change."""

    def __init__(self, urls, device, secret, stop):
        super().__init__(daemon=True)
        self.urls, self.device, self.stop = urls, device, stop
        self.rep = Reporter(urls[0], device, bytes.fromhex(secret), timeout=5)
        self.errors = 0
        self.rng = random.Random(device)

    def run(self):
        while not self.stop.is_set() and (self.rep.next_n <= REPORTS or self.rep.queue):
            if self.rep.next_n <= REPORTS:
                for _ in range(self.rng.randint(1, 3)):
                    if self.rep.next_n <= REPORTS:
                        self.rep.report("checked", version="1.0.0", boots=self.rep.next_n, heap=100000)
            self.rep.url = self.rng.choice(self.urls)  # behind a load balancer: any server
            self.rep.close()
            try:
                self.rep.flush()
            except OSError:
                self.errors += 1
                time.sleep(0.05)


def _register(db, n=DEVICES):
    store = Store(db)
    secrets = {f"dev{i}": new_secret() for i in range(n)}
    for d, s in secrets.items():
        store.register(d, s)
    store.close()
    return secrets


def _stored(db) -> dict:
    store = Store(db)
    try:
        out = {}
        for d in store.devices(limit=100)[1]:
            out[d["id"]] = sorted(e["n"] for e in store.events(device=d["id"], limit=10 ** 6))
        return out
    finally:
        store.close()


def test_sigkill_mid_stream_loses_no_acknowledged_report(fleet_db, tmp_path):
    secrets = _register(fleet_db)
    token = tmp_path / "token"
    server = Child(fleet_db, token, log=tmp_path / "server.log")
    urls, stop = [server.url], threading.Event()
    senders = [Sender(urls, d, s, stop) for d, s in secrets.items()]
    for s in senders:
        s.start()
    try:
        deadline = time.monotonic() + 60
        while sum(s.rep.acked for s in senders) < DEVICES * REPORTS // 3:
            assert time.monotonic() < deadline, "the server did not take reports"
            time.sleep(0.01)
        # one more request in flight for sure: headers and half a body sent
        host, port = server.url.split("//")[1].rsplit(":", 1)
        half = socket.create_connection((host, int(port)))
        half.sendall(b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\nX-Mpota-Device: dev0\r\n\r\n{")
        server.kill()  # SIGKILL: no shutdown handler runs
        acked = {s.device: s.rep.acked for s in senders}
        half.close()
        stored = _stored(fleet_db)
        for d, n in acked.items():  # every report acknowledged before the kill is committed
            assert set(range(1, n + 1)) <= set(stored.get(d, [])), d
        assert any(0 < n < REPORTS for n in acked.values()), "the kill did not come mid-stream"
        # the same port again (as a restarted service would be); the senders resend what is unacked
        server = Child(fleet_db, token, port=int(port), log=tmp_path / "server.log")
        for s in senders:
            s.join(90)
            assert not s.is_alive()
    finally:
        stop.set()
        server.stop()
    final = _stored(fleet_db)
    for d in secrets:  # each report exactly once, none missing
        assert final[d] == list(range(1, REPORTS + 1)), d
    assert sum(s.errors for s in senders) > 0  # they did see the server go away
    print(f"killed at {sum(acked.values())} acknowledged reports of {DEVICES * REPORTS}; "
          f"{sum(s.errors for s in senders)} connection errors, then resent")


def test_two_server_processes_on_one_postgresql(pg_cluster, tmp_path):
    db = pg_cluster.new_database("two_processes")
    secrets = _register(db, 6)
    token = tmp_path / "token"
    a = Child(db, token, log=tmp_path / "a.log")
    b = Child(db, token, log=tmp_path / "b.log")
    try:
        stop = threading.Event()
        senders = [Sender([a.url, b.url], d, s, stop) for d, s in secrets.items()]
        # and the same batch sent to both at the same moment, as a resend racing the original
        racer = Reporter(a.url, "dev5", bytes.fromhex(secrets["dev5"]))
        for s in senders:
            s.start()
        for s in senders:
            s.join(120)
            assert not s.is_alive()
        body = protocol.encode_batch("dev5", [rep(REPORTS + 1, "boot")])
        results = []

        def post(url):
            r = Reporter(url, "dev5", racer.secret)
            results.append(r.post(body)[0])
        ts = [threading.Thread(target=post, args=(u,)) for u in (a.url, b.url, a.url, b.url)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(results) == [200, 409, 409, 409]
    finally:
        a.stop()
        b.stop()
    final = _stored(db)
    for d in secrets:
        assert final[d] == list(range(1, REPORTS + 1 + (d == "dev5"))), d
    store = Store(db)
    try:  # both processes saved their counters at shutdown: the sums are the fleet's
        counts = store.counts()
        assert counts["reports"] == 6 * REPORTS + 1
        assert counts["refused:replay"] >= 3
    finally:
        store.close()


def test_serve_prints_its_address_first(tmp_path):
    with Child(str(tmp_path / "f.sqlite"), tmp_path / "tok") as c:
        assert c.url.startswith("http://127.0.0.1:") and len(c.token) >= 16
    assert (tmp_path / "tok").stat().st_mode & 0o777 == 0o600
