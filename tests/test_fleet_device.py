"""Fleet reports, the device side (docs/fleet.md): the real agent in the real micropython binary
on the simulated ESP32, reporting over real HTTP on loopback to a fleet server that implements
the protocol in CPython (tests/fleet_receiver.py: the HMAC checked with CPython's hmac, every
field of every report checked, the counter kept per device, answers as the protocol says).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import re
import secrets
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from conftest import run_micropython, tool
from fleet_receiver import FleetReceiver
from test_deploy import bare_device, repl  # noqa: F401 (fixtures: a board with nothing of mpota, its console)
from mpota import devicepkg, fleetprov
from mpota.sim import runner

QUEUE = ("ota_reports.0", "ota_reports.1")


@pytest.fixture
def receiver():
    r = FleetReceiver(token="the-admin-token").start()
    yield r
    r.stop()


def fleet_device(make_device, fw, server_url, receiver, name="dev", register=True, timeout_s=3, main=None, **kw):
    """A simulated device provisioned for `receiver` (and registered there, unless told not to)."""
    secret = secrets.token_hex(32)
    d = make_device(fw, server_url, name=name, fleet=fleetprov.config_entry(receiver.url, secret, timeout_s), **kw)
    if register:
        receiver.register(name, secret)
    if main is not None:
        runner.fs_write(d.dev, "main.py", main.encode())
    return d


def manifest_digest(server) -> str:
    return hashlib.sha256((server.root / "manifest.json").read_bytes()).hexdigest()


def queue(d) -> tuple[dict, list[bytes], int]:
    """The device's report queue as the agent reads it: (header, report lines, file size)."""
    best = None
    for name in QUEUE:
        data = runner.fs_read(d.dev, name)
        if not data:
            continue
        body, _, crc = data.rpartition(b"\n")
        if int(crc, 16) != zlib.crc32(body + b"\n"):
            continue
        head, *lines = body.split(b"\n")
        h = json.loads(head)
        if best is None or h["gen"] > best[0]["gen"]:
            best = (h, lines, len(data))
    assert best is not None, "no intact report queue on the device"
    return best


# ---- HMAC-SHA256 on the device ------------------------------------------------------------------

RFC4231 = [  # (key, data, HMAC-SHA-256; test case 5 is compared on its first 128 bits, as the RFC does)
    ("0b" * 20, b"Hi There".hex(), "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe".hex(), b"what do ya want for nothing?".hex(),
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    ("aa" * 20, "dd" * 50, "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    (bytes(range(1, 26)).hex(), "cd" * 50, "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"),
    ("0c" * 20, b"Test With Truncation".hex(), "a3b6167473100ee06e0c796c2955552b"),
    ("aa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First".hex(),
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"),
    ("aa" * 131, b"This is a test using a larger than block-size key and a larger than block-size data. The key "
                 b"needs to be hashed before being used by the HMAC algorithm.".hex(),
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"),
]

_HMAC_RUNNER = r"""
import sys, json
from binascii import hexlify, unhexlify
from ota.hmac import HMAC, new
with open(sys.argv[1]) as f:
    cases = json.load(f)
for key, data, parts in cases:
    key, data = unhexlify(key), unhexlify(data)
    h = HMAC(key)
    i = 0
    for n in parts:  # streamed in parts, as the report body is
        h.update(data[i:i + n])
        i += n
    h.update(memoryview(data)[i:])
    print(h.hexdigest(), hexlify(new(key, data).digest()).decode())
"""


def test_hmac_sha256_on_the_device_agrees_with_cpython_and_rfc_4231(tmp_path):
    lib = tmp_path / "lib"
    devicepkg.install_agent(lib, arch="x64")  # as a device runs it: .mpy
    rng = random.Random(4231)
    cases = [(k, m, []) for k, m, _ in RFC4231]
    for _ in range(60):  # keys of every length around the block size, messages in random parts
        key = rng.randbytes(rng.choice([0, 1, 31, 32, 63, 64, 65, 127, 128, 200]))
        msg = rng.randbytes(rng.randrange(0, 700))
        parts = [rng.randrange(0, 100) for _ in range(rng.randrange(0, 5))]
        cases.append((key.hex(), msg.hex(), parts))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = run_micropython(_HMAC_RUNNER, tmp_path / "cases.json", path=lib, tmp_path=tmp_path).split("\n")
    for (key, msg, _), line, i in zip(cases, out, range(len(cases))):
        streamed, oneshot = line.split()
        want = hmac.new(bytes.fromhex(key), bytes.fromhex(msg), hashlib.sha256).hexdigest()
        assert streamed == oneshot == want, f"case {i}"
        if i < len(RFC4231):
            assert want.startswith(RFC4231[i][2])


# ---- what gets reported ---------------------------------------------------------------------------


def test_an_update_and_its_confirmation_are_reported_in_order(server, firmware, signer, make_device, receiver):
    server.publish(firmware("2.0.0"), signer)
    d = fleet_device(make_device, firmware("1.0.0"), server.url, receiver)
    boots = d.run()
    assert [b.version for b in boots] == ["1.0.0", "2.0.0", "2.0.0"]
    reps = receiver.reports["dev"]
    # 1.0.0 checks, downloads, installs and resets before it could send anything; 2.0.0 confirms
    # itself on its trial boot (and resets), then sends all four, and its own up-to-date check.
    assert [r["event"] for r in reps] == ["checked", "downloading", "installed", "confirmed", "up-to-date"]
    assert [r["n"] for r in reps] == [1, 2, 3, 4, 5]
    digest = manifest_digest(server)  # the release, by the SHA-256 of its manifest envelope
    for r in reps[:3]:
        assert (r["version"], r["slot"], r["target"], r["digest"], r["code"]) == ("1.0.0", "ota_0", "2.0.0",
                                                                                  digest, None)
        assert r["boots"] == 1 and r["reset"] == runner.PWRON_RESET
    # update() queues its reports as it ends (one write; nothing leaves before it returns anyway):
    # ota_1 is set to boot, not booted yet
    assert all(r["slots"] == {"ota_0": "valid", "ota_1": "new"} for r in reps[:3])
    assert "written to ota_1" in reps[2]["detail"]
    conf = reps[3]
    assert (conf["version"], conf["slot"], conf["target"], conf["digest"]) == ("2.0.0", "ota_1", "2.0.0", digest)
    assert conf["slots"] == {"ota_0": "valid", "ota_1": "valid"}  # reported once the health check passed
    assert conf["boots"] == 2 and conf["reset"] == runner.HARD_RESET
    assert reps[4]["target"] is None and reps[4]["digest"] == digest and reps[4]["boots"] == 3
    for r in reps:
        assert (r["board"], r["chip"], r["dropped"]) == ("esp32", "esp32", 0)
        assert 0 < r["heap"] < 128 * 1024
    assert receiver.refused == {} and receiver.duplicates == 0
    assert [e["status"] for e in receiver.log] == [200, 200]  # after confirm(), then after update()
    h, lines, _ = queue(d)
    assert lines == [] and h["ack"] == 5 and h["next"] == 6


def test_a_rollback_is_reported_by_the_image_that_came_back(server, firmware, signer, make_device, receiver):
    server.publish(firmware("2.0.0"), signer)
    d = fleet_device(make_device, firmware("1.0.0"), server.url, receiver)
    d.run()
    server.publish(firmware("3.0.0", "unhealthy"), signer)
    bad = manifest_digest(server)
    boots = d.run()
    assert [b.version for b in boots] == ["2.0.0", "3.0.0", "2.0.0"]
    reps = receiver.reports["dev"][5:]
    assert [r["event"] for r in reps] == ["checked", "downloading", "installed", "rolled-back", "checked"]
    rb = reps[3]
    # made by 2.0.0 after it came back: its version, slot and boot; 3.0.0 never reported a thing
    assert (rb["version"], rb["slot"], rb["code"], rb["target"], rb["digest"]) == ("2.0.0", "ota_1", "health-failed",
                                                                                   "3.0.0", bad)
    assert "3.0.0 failed its health check" in rb["detail"]
    assert rb["slots"] == {"ota_0": "aborted", "ota_1": "valid"}
    assert rb["reset"] == runner.HARD_RESET and rb["boots"] == 6  # 3.0.0's trial boot counted too
    assert all(r["version"] != "3.0.0" for r in receiver.reports["dev"])
    # the next check finds 3.0.0 again and leaves it: "checked", with why
    assert (reps[4]["code"], reps[4]["target"]) == ("health-failed", "3.0.0")
    assert "rejected before" in reps[4]["detail"]
    assert [r["n"] for r in receiver.reports["dev"]] == list(range(1, 11))


def test_a_crash_before_confirming_is_reported_with_its_cause(server, firmware, signer, make_device, receiver):
    server.publish(firmware("2.0.0", "crash"), signer)
    d = fleet_device(make_device, firmware("1.0.0"), server.url, receiver)
    d.run()
    ev = [(r["event"], r["code"], r["version"]) for r in receiver.reports["dev"]]
    assert ev[:4] == [("checked", None, "1.0.0"), ("downloading", None, "1.0.0"), ("installed", None, "1.0.0"),
                      ("rolled-back", "rolled-back", "1.0.0")]
    assert "a panic or a reset" in receiver.reports["dev"][3]["detail"]


# ---- the queue: bounded, crash-safe, delivered ------------------------------------------------


def test_with_the_server_down_reports_queue_bounded_and_are_delivered_later(server, firmware, signer,
                                                                            make_device, receiver):
    server.publish(firmware("1.0.0"), signer)  # what it runs: every check is up to date
    d = fleet_device(make_device, firmware("1.0.0"), server.url, receiver,
                     main="import ota\nota.confirm(lambda: True)\nfor i in range(40):\n    ota.update()\n")
    port = receiver.port
    receiver.stop()
    d.run()
    h, lines, size = queue(d)
    assert size <= 4096 and all(len(x) <= 400 for x in lines)
    ns = [json.loads(x)["n"] for x in lines]
    assert ns == list(range(41 - len(ns), 41)) and 8 <= len(ns) < 40  # the oldest went first
    assert h["dropped"] == 40 - len(ns) and h["next"] == 41
    assert "report(s) kept: network" in d.output

    # Still down, and a real release comes: the update installs with a full queue, at the heap
    # the tests install at (128K).
    server.publish(firmware("2.0.0"), signer)
    d.dev.fs.joinpath("main.py").write_text("import ota\nota.guard()\nota.confirm(lambda: True)\nota.update()\n")
    boots = d.run()
    assert [b.version for b in boots] == ["1.0.0", "2.0.0", "2.0.0"]

    receiver.start(port)  # back
    d.dev.fs.joinpath("main.py").write_text("import ota\nota.confirm(lambda: True)\n")
    d.run()
    got = receiver.reports["dev"]
    ns = [r["n"] for r in got]
    assert ns == list(range(ns[0], ns[-1] + 1)), "a gap in what the queue kept"
    assert ns[-1] == 45 and [r["event"] for r in got][-5:] == ["checked", "downloading", "installed", "confirmed",
                                                               "up-to-date"]
    # nothing lost unknown: every counter never received is counted in a report's "dropped"
    assert max(r["dropped"] for r in got) == ns[0] - 1
    assert receiver.conflicts == [] and receiver.refused == {}
    h, lines, _ = queue(d)
    assert lines == [] and h["dropped"] == 0 and h["ack"] == 45


def test_a_lost_acknowledgement_means_a_resend_the_server_sees_as_duplicates(server, firmware, signer,
                                                                             make_device, receiver):
    server.publish(firmware("1.0.0"), signer)
    d = fleet_device(make_device, firmware("1.0.0"), server.url, receiver,
                     main="import ota\nota.confirm(lambda: True)\nota.update()\n")
    receiver.mode, receiver.mode_times = "lost-ack", 1  # committed, then the connection drops
    d.run()
    assert [e["status"] for e in receiver.log] == [None]
    assert "report(s) kept: bad-response" in d.output
    d.run()  # confirm() sends report 1 again: a replay (409); update() then sends report 2
    assert [(e["status"], e["ns"]) for e in receiver.log] == [(None, [1]), (409, [1]), (200, [2])]
    assert [r["n"] for r in receiver.reports["dev"]] == [1, 2]
    assert receiver.duplicates == 1 and receiver.conflicts == []
    h, lines, _ = queue(d)
    assert lines == [] and h["ack"] == 2


def test_a_stalled_server_holds_update_and_confirm_no_longer_than_the_fleet_timeout(server, firmware, signer,
                                                                                   make_device, receiver):
    server.publish(firmware("1.0.0"), signer)
    main = ("import ota, time\n"
            "t = time.ticks_ms(); ota.confirm(lambda: True); print('confirm took', time.ticks_diff(time.ticks_ms(), t))\n"
            "t = time.ticks_ms(); r = ota.update(); print('update took', time.ticks_diff(time.ticks_ms(), t), r)\n")
    d = fleet_device(make_device, firmware("1.0.0"), server.url, receiver, timeout_s=2, main=main)
    receiver.mode = "stall"  # reads the request, then sends nothing while the connection stays open (60 s)
    d.run()
    d.run()  # now confirm() has a report to send too
    took = {k: int(v) for k, v in re.findall(r"(confirm|update) took (\d+)", d.output)}
    assert 1500 <= took["confirm"] <= 3000, d.output  # it waited for the answer, then gave up in time
    assert 1500 <= took["update"] <= 5000, d.output
    assert "'error': None" in d.output  # the update itself was not disturbed
    assert len(receiver.log) == 3 and all(e["status"] is None for e in receiver.log)
    _, lines, _ = queue(d)
    assert len(lines) == 2  # kept, to be sent again


def test_nothing_is_sent_while_wifi_is_not_connected(server, firmware, signer, make_device, receiver):
    server.publish(firmware("1.0.0"), signer)
    main = ("import sys\n"
            "class WLAN:\n"  # the application's network module, as on a board: Wi-Fi on, not connected
            "    def __init__(self, i): pass\n"
            "    def active(self): return True\n"
            "    def isconnected(self): return %s\n"
            "class network: STA_IF = 0; WLAN = WLAN\n"
            "sys.modules['network'] = network\n"
            "import ota\nota.confirm(lambda: True)\nota.update()\n")
    d = fleet_device(make_device, firmware("1.0.0"), server.url, receiver, main=main % "False")
    d.run()
    assert "1 report(s) queued; the network is down" in d.output and receiver.log == []
    runner.fs_write(d.dev, "main.py", (main % "True").encode())
    d.run()
    assert [r["n"] for r in receiver.reports["dev"]] == [1, 2]


def test_the_servers_refusals(server, firmware, signer, make_device, receiver):
    # 503 (and 401, 404: a device not registered yet): kept. 400: the batch can never be taken:
    # dropped, and counted in the next report's "dropped".
    server.publish(firmware("1.0.0"), signer)
    d = fleet_device(make_device, firmware("1.0.0"), server.url, receiver, register=False,
                     main="import ota\nota.confirm(lambda: True)\nota.update()\n")
    d.run()
    assert receiver.refused == {"unknown-device": 1} and "answered 404" in d.output
    receiver.register("dev", "00" * 32)  # the wrong secret
    d.run()
    assert receiver.refused["bad-signature"] == 2 and "answered 401" in d.output
    cfg = json.loads(runner.fs_read(d.dev, "ota_config.json"))
    receiver.register("dev", cfg["fleet"]["secret"])
    receiver.mode, receiver.mode_times = "status=503", 1
    d.run()
    assert "answered 503" in d.output and [e["status"] for e in receiver.log][-2:] == [503, 200]
    assert [r["n"] for r in receiver.reports["dev"]] == [1, 2, 3]
    receiver.mode, receiver.mode_times = "status=400", 2
    d.run()  # confirm() has nothing to send; update()'s report 4 is refused for good
    receiver.mode = "ok"
    d.run()
    got = receiver.reports["dev"]
    assert [r["n"] for r in got] == [1, 2, 3, 5] and got[-1]["dropped"] == 1


def test_a_torn_or_garbled_queue_never_stops_the_agent(server, firmware, signer, make_device, receiver):
    server.publish(firmware("1.0.0"), signer)
    d = fleet_device(make_device, firmware("1.0.0"), server.url, receiver,
                     main="import ota\nota.confirm(lambda: True)\nprint('update:', ota.update())\n")
    d.run()
    h, _, _ = queue(d)
    newer = QUEUE[h["gen"] % 2]
    # the newer copy torn half-way (as FAT leaves a cut write): the older one is used
    data = runner.fs_read(d.dev, newer)
    runner.fs_write(d.dev, newer, data[:len(data) // 2])
    d.run()
    assert "'result': 'up-to-date'" in d.output and [r["n"] for r in receiver.reports["dev"]] == [1, 2]
    # both copies garbage: the agent goes on; the server tells it where its counter is (409's
    # ack), so that its next report is not taken for a replay
    for name in QUEUE:
        runner.fs_write(d.dev, name, b"\x00garbage" * 100)
    d.run()
    assert "'result': 'up-to-date'" in d.output
    assert receiver.log[-1]["status"] == 409
    d.run()
    assert [r["n"] for r in receiver.reports["dev"]] == [1, 2, 3]
    # (the one report lost with both copies reused counter 1: the server kept its first report 1)
    assert receiver.conflicts == [("dev", 1)]


@pytest.mark.parametrize("fs", ["littlefs", "fat"])
def test_a_power_cut_at_any_flash_operation_never_reuses_a_counter(fs, server, firmware, signer, make_device,
                                                                   tmp_path):
    # The filesystem in the flash (LittleFS as on a board, or FAT): every write of the report
    # queue and of the state is flash operations. Cut the power at each, before it and torn, in
    # a run that queues and sends reports; then run on. The server must never get two different
    # reports under one counter, the agent must go on working, and what it queued is delivered.
    # (LittleFS keeps a file's old content until it is closed; FAT tears it: the two copies are
    # for FAT. A FAT whose own table a cut wiped is counted apart, as in tests/test_powerloss.py.)
    from concurrent.futures import ThreadPoolExecutor
    from test_powerloss import FS_LOST, clone, fs_intact
    server.publish(firmware("1.0.0"), signer)
    workers = 2
    rxs = [FleetReceiver().start() for _ in range(workers)]
    try:
        secret = secrets.token_hex(32)
        templates, bases = [], []
        for i, rx in enumerate(rxs):
            d = make_device(firmware("1.0.0"), server.url, name="dev", hardware={"fs": fs},
                            fleet=fleetprov.config_entry(rx.url, secret, 3),
                            heap="160K" if fs == "fat" else "128K")  # VfsFat's sector buffer
            runner.fs_write(d.dev, "main.py", b"import ota\nota.confirm(lambda: True)\nota.update()\nota.update()\n")
            rx.register("dev", secret)
            runner.run(d.dev, echo=lambda line: None)  # reports 1, 2 delivered: a queue with a past
            assert rx.events("dev") == ["up-to-date", "up-to-date"]
            bases.append(dict(rx.raw))
            dest = tmp_path / f"template{i}"
            templates.append(clone(d.dev, dest))
        count = runner.PowerCut(None, ops_file=tmp_path / "ops")
        runner.run(clone(templates[0], tmp_path / "count"), echo=lambda line: None, cut=count)
        n = count.used
        assert n > 10
        cases = [(at, tear) for at in range(1, n + 1) for tear in (False, True)]

        def one(w):
            rx, failures = rxs[w], []
            for at, tear in cases[w::workers]:
                rx.reports.clear(), rx.conflicts.clear()
                rx.raw = dict(bases[w])
                rx.highest["dev"] = 2
                dev = clone(templates[w], tmp_path / f"c{at}-{int(tear)}")
                log = []
                try:
                    runner.run(dev, echo=log.append, cut=runner.PowerCut(at, tear, tmp_path / f"o{at}-{tear}"))
                    boots = runner.run(dev, echo=log.append)  # and on
                except runner.SimError as e:
                    failures.append(f"cut at {at} tear={tear}: {e}")
                    continue
                if fs == "fat" and not fs_intact(dev):
                    failures.append(FS_LOST)
                    continue
                text = "\n".join(log)
                if boots[-1].exit != "idle" or "Traceback" in text:
                    failures.append(f"cut at {at} tear={tear}: the agent failed\n{text[-1500:]}")
                elif rx.conflicts:
                    failures.append(f"cut at {at} tear={tear}: counter reused {rx.conflicts}")
                elif runner.status(dev)["last_result"] != "up-to-date":
                    failures.append(f"cut at {at} tear={tear}: {runner.status(dev)}")
                else:
                    got = [r["n"] for r in rx.reports.get("dev", [])]
                    if got != sorted(set(got)) or not got or got[0] != 3:
                        failures.append(f"cut at {at} tear={tear}: received {got}")
            return failures

        with ThreadPoolExecutor(workers) as pool:
            results = [f for got in pool.map(one, range(workers)) for f in got]
        failures = [f for f in results if f != FS_LOST]
        lost = len(results) - len(failures)
        from conftest import REPORT
        REPORT.append(f"power-loss sweep 'fleet report queue on {fs}': {n} flash operations x (before, torn) = "
                      f"{len(cases)} cases, {len(failures)} failed" + (f"; in {lost} {FS_LOST}" if lost else ""))
        assert not failures, "\n\n".join(failures[:3])
    finally:
        for rx in rxs:
            rx.stop()


# ---- without a fleet server: the device names itself -----------------------------------------------


def test_announce_names_the_device_in_the_release_servers_log(server, firmware, signer, make_device, tmp_path):
    server.publish(firmware("1.0.0"), signer)
    log = tmp_path / "access.log"
    proc = subprocess.Popen([tool("mpota"), "serve", str(server.root), "--port", "0", "--access-log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        url = re.search(r"on (http://\S+/)", first).group(1)
        d = make_device(firmware("1.0.0"), url, name="dev7", announce=True)
        d.run()
        d.run()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    lines = [x for x in log.read_text().splitlines() if "/manifest.json" in x]
    assert len(lines) == 2
    # first boot: nothing happened yet; then what the last update said
    assert '"GET /manifest.json?d=dev7&v=1.0.0&r=none HTTP/1.0" 200' in lines[0]
    assert lines[0].endswith('"mpota/0.1.0 (d=dev7; v=1.0.0; r=none)"')
    assert '"GET /manifest.json?d=dev7&v=1.0.0&r=up-to-date HTTP/1.0" 200' in lines[1]
    assert lines[1].endswith('"mpota/0.1.0 (d=dev7; v=1.0.0; r=up-to-date)"')
    assert re.match(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "GET ', lines[0])


def test_announce_carries_the_last_error_url_encoded(server, firmware, signer, make_device, fault_server):
    from faultserver import Fault
    server.publish(firmware("1.0.0"), signer)
    (fault_server.root / "manifest.json").write_bytes((server.root / "manifest.json").read_bytes())
    fault_server.faults.append(Fault(status=503, times=1))
    d = make_device(firmware("1.0.0"), fault_server.url, name="dev8", announce=True)
    d.run()
    d.run()
    paths = [r.path for r in fault_server.requests]
    assert paths == ["/manifest.json?d=dev8&v=1.0.0&r=none", "/manifest.json?d=dev8&v=1.0.0&r=failed%3Ahttp-503"]


def test_the_agent_version_announced_is_the_packages():
    src = (Path(__file__).resolve().parents[1] / "device" / "ota" / "ident.py").read_text()
    pkg = json.loads((Path(__file__).resolve().parents[1] / "device" / "package.json").read_text())
    assert f'AGENT = "{pkg["version"]}"' in src


# ---- provisioning on the host ----------------------------------------------------------------------


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_sim_create_fleet_makes_a_secret_registers_it_and_never_prints_it(tmp_path, keydir, firmware, server,
                                                                           signer, receiver):
    server.publish(firmware("1.0.0"), signer)
    token = tmp_path / "token"
    token.write_text("the-admin-token\n")
    base = [tool("mpota"), "sim", "create", "--pub", str(keydir / "release.pub"), "--server", server.url,
            "--firmware", str(firmware("1.0.0")), "--root", str(tmp_path / "devices"), "--fleet", receiver.url]
    r = subprocess.run(base[:3] + ["dev1"] + base[3:], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    dev1 = tmp_path / "devices" / "dev1"
    secret = (dev1 / "fleet.secret").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", secret)
    assert _mode(dev1 / "fleet.secret") == 0o600 and _mode(dev1 / "fs" / "ota_config.json") == 0o600
    cfg = json.loads((dev1 / "fs" / "ota_config.json").read_text())
    assert cfg["fleet"] == {"url": receiver.url, "secret": secret, "timeout_s": 3, "interval_s": 3600}
    assert secret not in r.stdout + r.stderr
    assert (f"mpota fleet register dev1 --secret-file {Path('devices') / 'dev1' / 'fleet.secret'}" in r.stdout
            or "mpota fleet register dev1 --secret-file" in r.stdout)
    assert receiver.devices == {}

    # with the admin token: registered at once, under the secret the device got
    r = subprocess.run(base[:3] + ["dev2"] + base[3:] + ["--fleet-token-file", str(token), "--fleet-interval", "600"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    secret2 = (tmp_path / "devices" / "dev2" / "fleet.secret").read_text().strip()
    assert receiver.devices["dev2"]["secret"] == bytes.fromhex(secret2) and receiver.devices["dev2"]["interval_s"] == 600
    assert secret2 not in r.stdout + r.stderr and "registered dev2" in r.stdout
    r = subprocess.run([tool("mpota"), "sim", "run", "dev2", "--root", str(tmp_path / "devices")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert receiver.events("dev2") == ["up-to-date"]  # signed with that secret, accepted

    # a wrong token: the device exists, the error says how to register it later
    token.write_text("wrong\n")
    r = subprocess.run(base[:3] + ["dev3"] + base[3:] + ["--fleet-token-file", str(token)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "admin token was refused" in r.stderr
    assert "dev3" not in receiver.devices


def test_deploy_fleet_dry_run_stages_the_secret_and_says_how_to_register(tmp_path, keydir):
    env = dict(os.environ)
    r = subprocess.run([tool("mpota"), "deploy", "--pub", str(keydir / "release.pub"), "--server", "http://h:8000",
                        "--board", "esp32", "--dry-run", "--fleet", "http://h:8470", "--device-id", "a1b2c3",
                        "--announce"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    secret_file = tmp_path / "keys" / "fleet" / "a1b2c3.secret"
    secret = secret_file.read_text().strip()
    assert _mode(secret_file) == 0o600
    staged = tmp_path / "build" / "deploy" / "esp32" / "ota_config.json"
    cfg = json.loads(staged.read_text())
    assert cfg["fleet"]["secret"] == secret and cfg["device_id"] == "a1b2c3" and cfg["announce"] is True
    assert _mode(staged) == 0o600
    assert secret not in r.stdout + r.stderr
    assert "mpota fleet register a1b2c3 --secret-file keys/fleet/a1b2c3.secret --server http://h:8470" in r.stdout
    # deployed again: the same secret (the device stays registered)
    r = subprocess.run([tool("mpota"), "deploy", "--pub", str(keydir / "release.pub"), "--server", "http://h:8000",
                        "--board", "esp32", "--dry-run", "--fleet", "http://h:8470", "--device-id", "a1b2c3"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and json.loads(staged.read_text())["fleet"]["secret"] == secret
    # a dry run cannot ask the board its id
    r = subprocess.run([tool("mpota"), "deploy", "--pub", str(keydir / "release.pub"), "--server", "http://h:8000",
                        "--board", "esp32", "--dry-run", "--fleet", "http://h:8470"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 2 and "--device-id" in r.stderr


def test_deploy_fleet_registers_the_board_and_its_reports_arrive(bare_device, repl, server, firmware, signer,  # noqa: F811
                                                                 keydir, tmp_path, receiver):
    # mpota deploy over the simulated board's console (tests/test_deploy.py's bridge), with the
    # admin token: the board gets the secret, the server its registration, under the board's id
    server.publish(firmware("1.0.0"), signer)
    token = tmp_path / "token"
    token.write_text("the-admin-token\n")
    r = subprocess.run([tool("mpota"), "deploy", "--port", repl.url, "--pub", str(keydir / "release.pub"),
                        "--server", server.url, "--fleet", receiver.url, "--fleet-token-file", str(token)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    uid = bare_device.hardware_env()["MPOTA_UID"]  # machine.unique_id() in hex
    secret = (tmp_path / "keys" / "fleet" / f"{uid}.secret").read_text().strip()
    assert receiver.devices[uid]["secret"] == bytes.fromhex(secret) and receiver.devices[uid]["board"] == "esp32"
    assert secret not in r.stdout + r.stderr and f"registered {uid}" in r.stdout
    cfg = json.loads((bare_device.fs / "ota_config.json").read_text())
    assert cfg["fleet"]["secret"] == secret and cfg["device_id"] == uid
    repl.stop()
    r = subprocess.run([tool("mpota"), "sim", "run", "dev", "--root", str(bare_device.path.parent)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert receiver.events(uid) == ["up-to-date"]


def test_a_bad_fleet_entry_turns_reports_off_not_updates(server, firmware, signer, make_device, receiver):
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    d.config(fleet={"url": receiver.url, "secret": "not hex"})
    boots = d.run()
    assert [b.version for b in boots] == ["1.0.0", "2.0.0", "2.0.0"]
    assert "fleet.secret must be 64 hex digits; reports are off" in d.output
    assert "not hex" not in d.output and receiver.log == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
