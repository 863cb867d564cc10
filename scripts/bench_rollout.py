#!/usr/bin/env python3
"""`make bench` (rollout part): a simulated fleet of --devices devices (1,000 by default) completing
a 4-stage rollout (1, 10, 50, 100 %) that the policy drives by itself, with real signed documents.

Each round of simulated time every device that has not updated yet reads RELEASE_DIR/rollout.json
and decides as a device does (rolloutdoc.open_document: Ed25519 verify and checks; then decide:
bucket, share, targets); a device let in downloads, installs and confirms, and reports it through
the fleet's real report path (storage ingest, SQLite, synchronous=FULL). Then the server's
evaluation runs once (rollouts.tick: read the inputs, rollout.evaluate, record, re-sign and
replace rollout.json when the stage changes). Each figure is printed beside a reference measured
in the same run, as a ratio. Prints numbers, asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpota import devicepkg, dsse, keys, rolloutdoc  # noqa: E402
from mpota.sim.runner import micropython_binary  # noqa: E402
from mpota.fleet import rollout, rollouts  # noqa: E402
from mpota.fleet.client import blank_report  # noqa: E402
from mpota.fleet.protocol import encode_batch, parse_batch  # noqa: E402
from mpota.fleet.storage import Store  # noqa: E402

STAGES_BP = [100, 1000, 5000, 10000]
BASE = dict(version="1.0.0", slot="ota_0", slots={"ota_0": "valid", "ota_1": "empty"}, board="esp32",
            chip="esp32", boots=1, reset=1, heap=110000)


def row(name, value, unit, ref, ref_unit, ratio_text):
    print(f"  {name:<30} {value:>10} {unit:<12} reference {ref:>10} {ref_unit:<18} {ratio_text}", flush=True)


def install_reports(device, digest, version):
    reps = [blank_report(1, "downloading", **{**BASE, "target": version, "digest": digest}),
            blank_report(2, "installed", **{**BASE, "target": version, "digest": digest}),
            blank_report(3, "confirmed", **{**BASE, "version": version, "slot": "ota_1", "digest": digest})]
    return parse_batch(encode_batch(device, reps), device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000, help="simulated devices (default 1000)")
    ap.add_argument("--min-devices", type=int, default=5, help="confirmations a stage needs (default 5)")
    ap.add_argument("--round-s", type=int, default=300, help="simulated seconds between device checks (default 300)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mpota-bench-rollout-"))
    try:
        run(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(a, tmp):
    print(f"rollout: {a.devices} simulated devices, stages {','.join(f'{b / 100:g}' for b in STAGES_BP)} %, "
          f"{a.min_devices} confirmations per stage, real signatures, SQLite", flush=True)
    keys.generate(tmp / "rollout")
    key = rollouts.load_key(tmp / "rollout")
    trusted = [key.public_key()]
    rel = tmp / "rel"
    rel.mkdir()
    env = dsse.sign(json.dumps({"schema": 1, "version": "2.0.0"}).encode(), [keys.Ed25519PrivateKey.generate()])
    (rel / "manifest.json").write_bytes(env)
    digest, version = rollouts.read_release(rel)
    store = Store(str(tmp / "fleet.sqlite"))
    devs = [(f"dev-{i:05d}", "00" * 32) for i in range(a.devices)]
    store.register_many(devs, interval_s=3600)
    now0 = time.time()
    now = now0
    rid = rollouts.start(store, key, rel, {"stages_bp": STAGES_BP, "min_devices": a.min_devices,
                                           "max_failure_rate": 0.05, "silent_after_s": 7200}, now=now)["id"]
    waiting = [d for d, _ in devs]
    seen = dict.fromkeys(waiting, 0)
    t_decide = t_ingest = t_tick = 0.0
    n_decide = n_ingest = n_ticks = n_signed = 0
    evaluated = 0
    rounds = 0
    wall0 = time.perf_counter()
    docs_read = []  # (the document, how many devices read it): for the agent's own decision below
    while True:
        rounds += 1
        now += a.round_s
        env_bytes = (rel / "rollout.json").read_bytes()
        docs_read.append((env_bytes, len(waiting), int(now), list(waiting)))
        still = []
        for d in waiting:
            t = time.perf_counter()
            doc = rolloutdoc.open_document(env_bytes, trusted)  # each device verifies on its own
            code = rolloutdoc.decide(doc, d, board="esp32", release=digest, now=int(now), clock_known=True,
                                     seen=seen[d])
            seen[d] = max(seen[d], doc["issued"])
            t_decide += time.perf_counter() - t
            n_decide += 1
            if code is None:
                b = install_reports(d, digest, version)
                t = time.perf_counter()
                store.ingest(b, "00" * 32, now=now)
                t_ingest += time.perf_counter() - t
                n_ingest += 1
            else:
                still.append(d)
        waiting = still
        t = time.perf_counter()
        done = rollouts.tick(store, key, holder="bench", now=now + 1)
        t_tick += time.perf_counter() - t
        n_ticks += 1
        evaluated += a.devices
        n_signed += sum(1 for e in done if e["action"] == "sign")
        state = store.rollout(rid)["state"]
        if state != "running" or rounds > 50:
            break
    wall = time.perf_counter() - wall0
    print(f"  ended {state} after {rounds} rounds ({rounds * a.round_s / 60:.0f} simulated minutes), "
          f"{a.devices - len(waiting)} devices updated, {n_signed} documents signed by the evaluation", flush=True)

    # references, measured now, on the same machine and data
    t = time.perf_counter()
    for _ in range(200):
        dsse.verify(env_bytes, trusted, rolloutdoc.PAYLOAD_TYPE, "rollout.json")
    t_verify = (time.perf_counter() - t) / 200
    body = store.rollout(rid)["document"]
    t = time.perf_counter()
    for _ in range(200):
        key.sign(b"x" * 600)
    t_sign = (time.perf_counter() - t) / 200
    t = time.perf_counter()
    for _ in range(50):
        rollouts.write_document(rel, rolloutdoc.sign({**body, "issued": body["issued"] + 1}, key))
    t_doc = (time.perf_counter() - t) / 50
    devices, attempts = store.rollout_inputs(version, digest)
    t = time.perf_counter()
    for _ in range(5):
        rollout.evaluate(store.rollout(rid), devices, attempts, now)
    t_eval = (time.perf_counter() - t) / 5
    t = time.perf_counter()
    for d in devices:
        rolloutdoc.bucket(d["id"], digest)
    t_bucket = (time.perf_counter() - t) / len(devices)

    per_dev_ingest = t_ingest / max(n_ingest, 1)
    row("time to complete", f"{wall:.2f}", "s wall", f"{t_ingest:.2f}", "s of it ingesting",
        f"{wall / t_ingest:.2f}x the report path alone" if t_ingest else "")
    row("evaluation (tick)", f"{evaluated / t_tick:.0f}", "devices/s", f"{1 / per_dev_ingest:.0f}",
        "devices/s ingest", f"{(evaluated / t_tick) * per_dev_ingest:.1f}x; {t_tick / n_ticks * 1000:.1f} ms per tick "
        f"of {a.devices} devices")
    row("policy alone (evaluate)", f"{len(devices) / t_eval:.0f}", "devices/s", f"{1 / t_bucket:.0f}",
        "buckets/s (SHA-256)", f"{t_eval / len(devices) / t_bucket:.1f}x the bucket hash")
    row("sign + replace rollout.json", f"{t_doc * 1000:.2f}", "ms", f"{t_sign * 1000:.3f}", "ms Ed25519 sign",
        f"{t_doc / t_sign:.1f}x")
    row("device decision", f"{t_decide / n_decide * 1e6:.0f}", "us (host)", f"{t_verify * 1e6:.0f}",
        "us dsse.verify", f"{t_decide / n_decide / t_verify:.2f}x ({n_decide} decisions: open_document + decide)")
    agent_decisions(tmp, docs_read, digest, key.public_key(), t_decide / n_decide)
    store.close()


# The agent's own code (device/ota: envelope, signature, Ed25519, rollout), compiled to .mpy and
# run by the micropython unix port on the same documents: each document verified (as each
# device does once per check; timed over 8 runs), then checked and decided for every device
# that read it.
AGENT = r"""
import sys, json, time
from binascii import unhexlify
from ota.envelope import open_envelope
from ota.rollout import check, decide
from ota.jsonfile import loads
pub = unhexlify(sys.argv[2])
f = open(sys.argv[1])
while True:
    line = f.readline()
    if not line:
        break
    c = json.loads(line)
    env = c["env"].encode()
    t = time.ticks_us()
    n = 8
    for _ in range(n):
        body = open_envelope(env, [pub], "application/vnd.mpota.rollout+json", "rollout")
    t_verify = time.ticks_diff(time.ticks_us(), t) / n
    t = time.ticks_us()
    held = 0
    for d in c["devices"]:
        doc = loads(body)
        check(doc)
        if decide(doc, d, "esp32", [], c["release"], c["now"], True, 0) is not None:
            held += 1
    t_decide = time.ticks_diff(time.ticks_us(), t) / max(len(c["devices"]), 1)
    print(json.dumps([t_verify, t_decide, held]))
"""


def agent_decisions(tmp, docs_read, digest, pub, host_per_device):
    import subprocess
    lib = tmp / "agent"
    devicepkg.install_agent(lib, arch="x64")
    cases = tmp / "docs.txt"
    cases.write_text("".join(json.dumps({"env": env.decode(), "devices": devs, "release": digest, "now": now}) + "\n"
                             for env, _n, now, devs in docs_read))
    script = tmp / "agent_bench.py"
    script.write_text(AGENT)
    r = subprocess.run([micropython_binary(), "-X", "heapsize=512K", str(script), str(cases),
                        keys.raw_public(pub).hex()],
                       capture_output=True, text=True, env={"MICROPYPATH": f".frozen:{lib}"}, timeout=1800)
    if r.returncode:
        print("  the agent's decision: could not run: " + (r.stderr or r.stdout)[-400:])
        return
    out = [json.loads(x) for x in r.stdout.splitlines()]
    reads = sum(n for _e, n, _t, _d in docs_read)
    verify = sum(v for v, _d, _h in out) / len(out)
    decide = sum(d * n for (_v, d, _h), (_e, n, _t, _d2) in zip(out, docs_read)) / reads
    fleet_s = sum((v + d) * n for (v, d, _h), (_e, n, _t, _d2) in zip(out, docs_read)) / 1e6
    held = [h for _v, _d, h in out]
    host_held = []
    for env, _n, now, devs in docs_read:
        doc = rolloutdoc.open_document(env, [pub])
        host_held.append(sum(1 for d in devs if rolloutdoc.decide(doc, d, board="esp32", release=digest, now=now,
                                                                  clock_known=True) is not None))
    row("agent: verify a document", f"{verify / 1000:.1f}", "ms (mpy x64)", f"{host_per_device * 1e6:.0f}",
        "us host decision", f"{verify / 1e6 / host_per_device:.0f}x (Ed25519 in MicroPython, once per check)")
    row("agent: check + decide", f"{decide:.0f}", "us (mpy x64)", f"{host_per_device * 1e6:.0f}",
        "us host decision", f"{decide / 1e6 / host_per_device:.2f}x (held per round: {held}; host: {host_held})")
    row("agent: the whole fleet", f"{fleet_s:.1f}", "device-CPU s", f"{reads}", "document reads",
        f"{fleet_s / reads * 1000:.1f} ms per device check, {len(out)} documents")


if __name__ == "__main__":
    main()
