#!/usr/bin/env python3
"""`make bench` (fleet part): reports per second that `mpota fleet serve` ingests, and the p50 /
p99 latency of one POST /v1/reports, with SQLite (one server process) and PostgreSQL (one and two
server processes, the load spread over them as a load balancer would). The clients are CPython
threads with real HMAC-SHA256, one HTTP/1.1 connection each; every device sends --rounds
batches of --batch reports (each report as the protocol has it). Each acknowledged batch is
committed (the server answers only after COMMIT): SQLite with synchronous=FULL, PostgreSQL with
its defaults (fsync on). Prints numbers, asserts nothing; the load generator runs on the same
cores as the servers, so the figures are a floor.

  python scripts/bench_fleet.py --devices 100000 --rounds 1     # the issue's 100,000 devices
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpota.fleet import pgcluster  # noqa: E402
from mpota.fleet.client import Reporter  # noqa: E402
from mpota.fleet.server import Child  # noqa: E402
from mpota.fleet.storage import Store  # noqa: E402


def load(urls, devs, rounds, batch, threads):
    """Post every device's reports; (reports acknowledged, seconds, sorted latencies in s)."""
    lat, errors, done = [], [], [0]
    lock = threading.Lock()

    def worker(k):
        mine = devs[k::threads]
        reps = [Reporter(urls[i % len(urls)], d, bytes.fromhex(s), timeout=30) for i, (d, s) in enumerate(mine)]
        local, n = [], 0
        try:
            for _ in range(rounds):
                for r in reps:
                    for _ in range(batch):
                        r.report("checked", version="1.0.0", slot="ota_0", board="esp32", chip="esp32",
                                 slots={"ota_0": "valid", "ota_1": "empty"}, boots=3, reset=1, heap=110000)
                    t = time.perf_counter()
                    if not r.flush():
                        raise RuntimeError(f"refused: {r.last_status}")
                    r.close()  # as a device does: connect, post, disconnect
                    local.append(time.perf_counter() - t)
                    n += batch
        except Exception as e:  # report it, do not hang the bench
            errors.append(repr(e))
        finally:
            for r in reps:
                r.close()
        with lock:
            lat.extend(local)
            done[0] += n

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    secs = time.perf_counter() - t0
    if errors:
        print(f"    errors: {errors[:3]}")
    return done[0], secs, sorted(lat)


def pct(xs, q):
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run(name, db, processes, a, tmp):
    store = Store(db)
    devs = [(f"bench-{i:06d}", secrets.token_bytes(32).hex()) for i in range(a.devices)]
    t = time.perf_counter()
    store.register_many(devs)
    reg = time.perf_counter() - t
    store.close()
    servers = [Child(db, tmp / "token", log=tmp / f"{name}-{k}.log") for k in range(processes)]
    try:
        n, secs, lat = load([s.url for s in servers], devs, a.rounds, a.batch, a.threads)
    finally:
        for s in servers:
            s.stop()
    print(f"  {name:<30} {n / secs:>8.0f} reports/s  {n / a.batch / secs:>7.0f} batches/s   "
          f"p50 {pct(lat, 0.5) * 1000:6.1f} ms  p99 {pct(lat, 0.99) * 1000:6.1f} ms   "
          f"({n} reports from {a.devices} devices in {secs:.1f} s; {a.devices} registered in {reg:.1f} s)", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=2000, help="devices (default 2000; the issue's figure: 100000)")
    p.add_argument("--rounds", type=int, default=1, help="batches per device (default 1)")
    p.add_argument("--batch", type=int, default=4, help="reports per batch (default 4, at most 16)")
    p.add_argument("--threads", type=int, default=16, help="client threads (default 16)")
    p.add_argument("--only", choices=("sqlite", "postgresql"), help="one backend only")
    a = p.parse_args()
    print(f"fleet ingest: {a.devices} devices x {a.rounds} batch(es) of {a.batch} reports, {a.threads} client "
          f"threads, {os.cpu_count()} CPU cores shared by clients, servers and database")
    tmp = Path(tempfile.mkdtemp(prefix="mpota-bench-fleet-"))
    try:
        if a.only in (None, "sqlite"):
            run("SQLite, 1 process", str(tmp / "fleet.sqlite"), 1, a, tmp)
        if a.only in (None, "postgresql"):
            why = pgcluster.unavailable_reason()
            if why:
                print(f"  PostgreSQL: skipped ({why})")
                return
            with pgcluster.Cluster(durable=True) as pg:
                for procs in (1, 2):
                    run(f"PostgreSQL, {procs} process{'es' if procs > 1 else ''}",
                        pg.new_database(f"bench{procs}"), procs, a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
