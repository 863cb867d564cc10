"""Phased rollouts end to end (issue 12): a simulated fleet (the real agent in the real micropython
binary, each device with the rollout role, its fleet secret and two sources: an edge mirror first,
the origin as failover) behind a real `mpota fleet serve` that holds the rollout key and re-signs
`rollout.json` in the origin's release directory; the origin and the mirror serve static files.

What must hold:
- a healthy release goes from 1 % to 100 % by itself, every device installing only when its
  bucket is inside the share of the document it read; the origin is down whenever the devices
  check, so the edge mirror (synced in between, as `mpota mirror sync --every` would) serves
  the fleet;
- an unhealthy release halts in its first stage and no device outside that stage installs it;
- a replayed pre-halt rollout document is refused;
- devices outside their maintenance window download but wait, and install inside it without
  downloading again.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mpota import deviceconfig, espimage, fleetprov, keys, mirror, release, rollout, rolloutdoc
from mpota.faultserver import Fault, FaultServer
from mpota.fleet.client import Admin
from mpota.fleet.server import start_subprocess
from mpota.server import serve_in_thread
from mpota.sim import device, runner

N_DEVICES = 24  # two dozen
FIRST_BAD = 4  # devices in the unhealthy release's first stage (25 %)


def digest(d: Path) -> str:
    return hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()


def publish(src: Path, dst: Path) -> None:
    """Replace the release in `dst` (the origin's directory) with the one in `src`."""
    dst.mkdir(exist_ok=True)
    for p in dst.iterdir():
        p.unlink()
    for p in src.iterdir():
        shutil.copy2(p, dst / p.name)


def pick_names(d_good: str, d_bad: str) -> list[str]:
    """Device ids whose buckets make the stages certain (the digests differ from run to run):
    FIRST_BAD devices in the unhealthy release's 25 % stage, the rest outside it, and at least
    two of them in the healthy release's 25 % stage."""
    def b(name, d):
        return rolloutdoc.bucket(name, d)
    pool = [f"dev-{i:04d}" for i in range(5000)]
    first = [n for n in pool if rolloutdoc.in_share(b(n, d_bad), 2500)][:FIRST_BAD]
    rest = [n for n in pool if not rolloutdoc.in_share(b(n, d_bad), 2500)]
    good_early = [n for n in rest if rolloutdoc.in_share(b(n, d_good), 2500)][:2]
    others = [n for n in rest if n not in good_early][:N_DEVICES - FIRST_BAD - 2]
    return first + good_early + others


@pytest.fixture
def fleet(tmp_path):
    kdir = tmp_path / "keys"
    keys.generate(kdir / "release")
    keys.generate(kdir / "rollout")
    signer = keys.load_private(kdir / "release")
    fw1 = tmp_path / "fw-1.0.0.bin"
    fw1.write_bytes(espimage.build_sim_firmware("1.0.0", size=32 * 1024))
    rels = {}
    for version, behavior in (("2.0.0", "healthy"), ("3.0.0", "unhealthy")):
        img = tmp_path / f"fw-{version}.bin"
        img.write_bytes(espimage.build_sim_firmware(version, behavior=behavior, size=32 * 1024))
        release.build(img, tmp_path / f"rel-{version}", [signer], board="esp32")
        rels[version] = tmp_path / f"rel-{version}"
    origin_dir, mirror_dir = tmp_path / "origin", tmp_path / "edge"
    publish(rels["2.0.0"], origin_dir)
    mirror_dir.mkdir()
    origin = FaultServer(origin_dir).start()
    edge, edge_url = serve_in_thread(mirror_dir)
    names = pick_names(digest(rels["2.0.0"]), digest(rels["3.0.0"]))
    devices = {}
    for name in names:
        entry = fleetprov.config_entry("http://127.0.0.1:9/", secrets.token_hex(fleetprov.SECRET_BYTES),
                                       interval_s=3600)
        devices[name] = (entry, device.create(
            name, [kdir / "release.pub"], edge_url, fw1, root=tmp_path / "devices", mirrors=[origin.url],
            fleet=entry, rollout=deviceconfig.rollout_settings([kdir / "rollout.pub"])))
    yield {"tmp": tmp_path, "keys": kdir, "rels": rels, "origin": origin, "origin_dir": origin_dir,
           "mirror_dir": mirror_dir, "devices": devices,
           "pubs": ([keys.load_public(kdir / "release.pub")], [keys.load_public(kdir / "rollout.pub")])}
    origin.stop()
    edge.shutdown()


def set_fleet_url(devices, url: str) -> None:
    for _entry, dev in devices.values():
        cfg_path = dev.fs / "ota_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["fleet"]["url"] = url
        cfg_path.write_text(json.dumps(cfg))


def run_all(devs, **kw) -> dict:
    def one(dev):
        lines = []
        runner.run(dev, echo=lines.append, max_boots=6, **kw)
        return dev.name, lines
    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, devs))


def run_behind_the_mirror(origin, devs) -> None:
    """A round of checks while the origin is down: the devices hear only the edge mirror, so the
    rollout document each one read is the one the mirror holds (the origin's may be newer)."""
    origin.faults = [Fault(status=503)]
    try:
        run_all(devs)
    finally:
        origin.faults = []


def wait_for(admin: Admin, rid: str, pred, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = admin.rollout(rid)
        if pred(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def test_a_healthy_release_spreads_by_itself_and_an_unhealthy_one_halts_in_its_first_stage(fleet):
    tmp, devices = fleet["tmp"], fleet["devices"]
    origin, origin_dir, mirror_dir = fleet["origin"], fleet["origin_dir"], fleet["mirror_dir"]
    release_pubs, rollout_pubs = fleet["pubs"]
    devs = [dev for _e, dev in devices.values()]
    with start_subprocess(str(tmp / "fleet.sqlite"), tmp / "fleet.token", log=tmp / "fleet.log",
                          args=["--rollout-key", str(fleet["keys"] / "rollout"), "--rollout-interval", "0.2"]) as srv:
        admin = Admin(srv.url, srv.token)
        set_fleet_url(devices, srv.url)
        for name, (entry, _dev) in devices.items():
            admin.register(name, entry["secret"], board="esp32", interval_s=3600)

        # 1. The healthy release: 1 % -> 25 % -> 100 %, advanced by the server as devices confirm.
        d_good = digest(origin_dir)
        rid = admin.start_rollout(str(origin_dir), stages_bp=[100, 2500, 10000], min_devices=2,
                                  max_failure_rate=0.2, silent_after_s=600)["rollout"]["id"]
        version = {dev.name: "1.0.0" for dev in devs}
        shares = []
        for _round in range(6):
            mirror.sync(origin.url, mirror_dir, release_pubs, rollout_pubs)
            doc = rolloutdoc.open_document((mirror_dir / "rollout.json").read_bytes(), rollout_pubs)
            share = rolloutdoc.share_at(doc["stages"], doc["issued"])
            shares.append(share)
            run_behind_the_mirror(origin, devs)
            for dev in devs:
                now = runner.status(dev)["version"]
                if now != version[dev.name]:
                    # an install only where the device's bucket is in the share it read
                    assert rolloutdoc.in_share(rolloutdoc.bucket(dev.name, d_good), share), (dev.name, share)
                    version[dev.name] = now
            seen = doc["issued"]
            st = wait_for(admin, rid, lambda s, seen=seen: s["rollout"]["state"] == "complete" or s["rollout"]["issued"] > seen)
            if st["rollout"]["state"] == "complete":
                break
        assert st["rollout"]["state"] == "complete", st["decision"]
        print("shares the devices read, round by round:", shares, "installed:",
              sorted(n for n, v in version.items() if v == "2.0.0"))
        assert shares[0] in (100, 2500) and 2500 in shares, shares  # the 1 % stage is empty: it advances at once
        acts = [h["action"] for h in reversed(st["history"])]
        assert acts.count("advance") == 2 and acts[-1] == "complete", acts
        mirror.sync(origin.url, mirror_dir, release_pubs, rollout_pubs)
        run_behind_the_mirror(origin, [dev for dev in devs if version[dev.name] != "2.0.0"])
        assert {runner.status(dev)["version"] for dev in devs} == {"2.0.0"}

        # 2. The unhealthy release: its first stage installs, fails its health check and rolls
        # back; the server halts the rollout; nobody else installs it.
        publish(fleet["rels"]["3.0.0"], origin_dir)
        d_bad = digest(origin_dir)
        first = {dev.name for dev in devs if rolloutdoc.in_share(rolloutdoc.bucket(dev.name, d_bad), 2500)}
        assert len(first) == FIRST_BAD
        rid = admin.start_rollout(str(origin_dir), stages_bp=[2500, 10000], min_devices=3, max_failure_rate=0.05,
                                  silent_after_s=600, id="r-bad")["rollout"]["id"]
        mirror.sync(origin.url, mirror_dir, release_pubs, rollout_pubs)
        before_halt = (mirror_dir / "rollout.json").read_bytes()
        run_behind_the_mirror(origin, devs)
        st = wait_for(admin, rid, lambda s: s["rollout"]["state"] == "halted")
        for _round in range(3):
            # a report the fleet server did not take in time (a loaded machine: fleet.timeout_s
            # is 3 s) waits in the device's queue and goes with its next check, as in the field
            if st["rollout"]["state"] == "halted" and st["stages"][0]["failed"] == FIRST_BAD:
                break
            run_behind_the_mirror(origin, [dev for dev in devs if dev.name in first])
            st = wait_for(admin, rid, lambda s: s["rollout"]["state"] == "halted"
                          and s["stages"][0]["failed"] == FIRST_BAD)
        assert st["rollout"]["state"] == "halted" and st["rollout"]["stage"] == 1, st["decision"]
        assert st["stages"][0]["failed"] == FIRST_BAD and st["stages"][1]["attempts"] == 0, st["stages"]
        mirror.sync(origin.url, mirror_dir, release_pubs, rollout_pubs)
        halted = rolloutdoc.open_document((mirror_dir / "rollout.json").read_bytes(), rollout_pubs)
        assert halted["halted"] and rolloutdoc.share_at(halted["stages"], halted["issued"]) == 0
        assert halted["exclude"] and set(halted["exclude"]) <= first  # the penalty box, as of the halt
        run_behind_the_mirror(origin, devs)
        for dev in devs:
            st_dev = runner.status(dev)
            assert st_dev["version"] == "2.0.0", (dev.name, st_dev)
            events = admin.device(dev.name, limit=200)["events"]
            installed_bad = [e for e in events if e["event"] == "installed" and e.get("digest") == d_bad]
            if dev.name in first:
                assert installed_bad and st_dev["last_error"] in ("health-failed", "rejected"), (dev.name, st_dev)
            else:
                assert not installed_bad, (dev.name, installed_bad)
                assert st_dev["last_error"] == "rollout-halted", (dev.name, st_dev)

        # 3. A compromised mirror replays the document from before the halt (the origin down, so
        # the mirror is all the devices hear): refused, nothing installs.
        (mirror_dir / "rollout.json").write_bytes(before_halt)
        outside = [dev for dev in devs if dev.name not in first]
        run_behind_the_mirror(origin, outside)
        for dev in outside:
            st_dev = runner.status(dev)
            assert st_dev["version"] == "2.0.0" and st_dev["last_error"] == "rollout-replayed", (dev.name, st_dev)


def test_devices_outside_their_window_download_but_wait(tmp_path):
    kdir = tmp_path / "keys"
    keys.generate(kdir / "release")
    keys.generate(kdir / "rollout")
    fw1 = tmp_path / "fw-1.0.0.bin"
    fw1.write_bytes(espimage.build_sim_firmware("1.0.0", size=32 * 1024))
    img = tmp_path / "fw-2.0.0.bin"
    img.write_bytes(espimage.build_sim_firmware("2.0.0", size=32 * 1024))
    rel = tmp_path / "rel"
    release.build(img, rel, [keys.load_private(kdir / "release")], board="esp32")
    # every day 02:00-03:00 UTC, no jitter; the whole fleet
    rollout.sign(rel, keys.load_private(kdir / "rollout"), share="100",
                 window={"cron": "0 2 * * *", "duration_s": 3600, "utc_offset_min": 0, "jitter_s": 0})
    origin = FaultServer(rel).start()
    try:
        devs = [device.create(f"w{i}", [kdir / "release.pub"], origin.url, fw1, root=tmp_path / "devices",
                              rollout=deviceconfig.rollout_settings([kdir / "rollout.pub"], ntp="pool.ntp.org"))
                for i in range(3)]
        day = int(time.time()) // 86400 * 86400 + 86400

        def fetched():
            return sum(1 for r in origin.requests if not r.path.endswith(".json"))

        run_all(devs, net_time=f"{day + 12 * 3600 - int(time.time()):+d}")  # noon UTC: outside
        got = fetched()
        for dev in devs:
            st = runner.status(dev)
            assert st["version"] == "1.0.0" and st["last_error"] == "outside-window", st
        assert got >= len(devs), got  # each downloaded the payload
        run_all(devs, net_time=f"{day + 2 * 3600 + 600 - int(time.time()):+d}")  # 02:10 UTC: inside
        for dev in devs:
            st = runner.status(dev)
            assert st["version"] == "2.0.0", st
        assert fetched() == got  # installed without downloading again
    finally:
        origin.stop()
