"""Network faults against a real loopback server that misbehaves on purpose. Each ends with a
clear error code and a retry later, or a resumed download, never a half-installed image."""
from __future__ import annotations

import pytest

from faultserver import Fault
from mpota import release
from mpota.sim import runner

SIZE = 96 * 1024


@pytest.fixture
def setup(fault_server, firmware, signer, make_device):
    release.build(firmware("2.0.0", size=SIZE), fault_server.root, [signer])
    d = make_device(firmware("1.0.0"), fault_server.url)
    d.config(timeout_s=1, progress_every=2)
    return fault_server, d, firmware("2.0.0", size=SIZE).name


def payload_requests(fs, name):
    return [r for r in fs.requests if r.path.endswith(name)]


def assert_untouched(d):
    st = d.status()
    assert st["version"] == "1.0.0" and st["slot"] == "ota_0" and st["pending"] is None
    assert st["slots"] == {"ota_0": "VALID", "ota_1": "UNDEFINED"}  # as the first boot left it


def test_dropped_connection_resumes_with_range_in_the_same_update(setup):
    fs, d, name = setup
    fs.faults = [Fault(path=name, drop_after=30000, times=1)]
    d.run()
    assert d.status()["version"] == "2.0.0", d.output
    reqs = payload_requests(fs, name)
    assert [r.range for r in reqs] == [None, "bytes=28672-"]  # 7 whole blocks survived
    assert "reconnecting" in d.output


def test_drops_at_several_offsets_still_complete(setup):
    fs, d, name = setup
    fs.faults = [Fault(path=name, drop_after=n, times=1) for n in (5000, 20000, 33333)]
    d.run()
    assert d.status()["version"] == "2.0.0", d.output
    assert len(payload_requests(fs, name)) == 4


def test_a_link_that_keeps_dropping_fails_then_resumes_in_a_later_update(setup):
    fs, d, name = setup
    fs.faults = [Fault(path=name, drop_after=9000)]  # every time
    d.run()
    assert d.status()["last_error"] == "truncated"
    assert_untouched(d)
    assert d.state()["progress"]["done"] > 0
    fs.faults = []
    fs.requests.clear()
    d.run()
    assert d.status()["version"] == "2.0.0"
    first = payload_requests(fs, name)[0]
    assert first.range is not None and first.range != "bytes=0-", first
    assert "resuming 2.0.0" in d.output


def test_reset_in_the_middle_of_a_download_resumes_after_boot(setup):
    fs, d, name = setup
    # power fails at the 14th flash operation (mid-payload)
    boots = runner.run(d.dev, echo=d.log.append, cut=runner.PowerCut(14), max_boots=6)
    assert boots[0].exit == "power-loss"
    assert d.status()["version"] == "2.0.0", d.output
    assert "resuming 2.0.0" in d.output
    assert any(r.range for r in payload_requests(fs, name))


def test_server_that_ignores_range_makes_it_start_over(setup):
    fs, d, name = setup
    fs.faults = [Fault(path=name, drop_after=50000, times=1),
                 Fault(path=name, ignore_range=True, times=5)]
    d.run()
    assert d.status()["version"] == "2.0.0", d.output
    assert "server ignored the Range request: starting over" in d.output


@pytest.mark.parametrize("status,code", [(404, "http-404"), (500, "http-500"), (503, "http-503")])
def test_http_errors_are_transport_errors(status, code, setup):
    fs, d, name = setup
    fs.faults = [Fault(path="manifest.json", status=status, retry_after="120")]
    out = d.run()
    assert out[-1].exit == "idle"
    st = d.status()
    assert st["last_error"] == code and st["last_result"] == "failed"
    assert_untouched(d)
    if status == 503:
        assert d.state()["retry_after"] == 120


def test_payload_404_after_a_good_manifest(setup):
    fs, d, name = setup
    fs.faults = [Fault(path=name, status=404)]
    d.run()
    assert d.status()["last_error"] == "http-404"
    assert_untouched(d)


def test_stalled_server_times_out(setup):
    fs, d, name = setup
    fs.faults = [Fault(path=name, stall_after=10000)]
    d.run()
    assert d.status()["last_error"] == "network", d.output
    assert_untouched(d)


def test_trickling_server_is_too_slow(setup):
    fs, d, name = setup
    fs.faults = [Fault(path=name, trickle=0.05)]
    d.run()
    assert d.status()["last_error"] == "too-slow", d.output
    assert_untouched(d)


@pytest.mark.parametrize("delta,code", [(+1000, "too-long"), (-1000, "truncated")])
def test_wrong_content_length(delta, code, setup):
    fs, d, name = setup
    fs.faults = [Fault(path=name, length_delta=delta)]
    d.run()
    assert d.status()["last_error"] == code, d.output
    assert_untouched(d)


def test_redirect_loop(setup):
    fs, d, name = setup
    fs.faults = [Fault(path="manifest.json", redirect_to="/manifest.json")]
    d.run()
    assert d.status()["last_error"] == "redirect-loop"
    assert_untouched(d)


def test_a_redirect_to_an_unusable_url_is_the_servers_fault(setup):
    # a transport error (bad-response, tried again later), not bad-url, which blames our config
    fs, d, name = setup
    fs.faults = [Fault(path="manifest.json", redirect_to="ftp://elsewhere/manifest.json")]
    d.run()
    assert d.status()["last_error"] == "bad-response", d.output
    assert "redirect" in d.status()["detail"]
    assert_untouched(d)


def test_a_redirect_is_followed(setup):
    fs, d, name = setup
    fs.faults = [Fault(path="manifest.json", redirect_to="/manifest.json", times=1)]
    d.run()
    assert d.status()["version"] == "2.0.0"


@pytest.mark.parametrize("bomb", ["long-line", "many"])
def test_hostile_headers(bomb, setup):
    fs, d, name = setup
    fs.faults = [Fault(path="manifest.json", header_bomb=bomb)]
    d.run()
    assert d.status()["last_error"] == "bad-response"
    assert_untouched(d)


def test_mirror_failover(setup, tmp_path, firmware, signer):
    fs, d, name = setup
    fs.faults = [Fault(path="/manifest.json", status=500)]
    d.config(mirrors=[fs.url + "mirror/"])
    release.build(firmware("2.0.0", size=SIZE), fs.root / "mirror", [signer])
    d.run()
    assert d.status()["version"] == "2.0.0", d.output
    assert any(r.path.startswith("/mirror/") for r in payload_requests(fs, name))


def test_a_mirror_serving_a_forged_release_is_skipped(setup, firmware, keydir):
    from mpota import keys
    fs, d, name = setup
    release.build(firmware("9.9.9", size=SIZE), fs.root / "evil", [keys.load_private(keydir / "foreign")])
    d.config(server=fs.url + "evil/", mirrors=[fs.url])
    d.run()
    assert d.status()["version"] == "2.0.0", d.output
    assert "unknown-key" in d.output


@pytest.mark.parametrize("encrypt", [False, True], ids=["deflate", "deflate+aes"])
def test_compressed_download_resumes_at_a_chunk_boundary(encrypt, fault_server, firmware, signer, make_device, tmp_path):
    from mpota import payload
    key = None
    if encrypt:
        payload.generate_aes_key(tmp_path / "k.aes")
        key = payload.load_aes_key(tmp_path / "k.aes")
    rel = release.build(firmware("2.0.0", size=SIZE), fault_server.root, [signer], compress=True,
                        aes_key=key, chunk=16 * 1024)
    p = rel.manifest["payload"]
    sizes = [c[0] for c in p["chunks"]]
    cut = sizes[0] + sizes[1] + sizes[2] // 2  # in the middle of the third chunk
    fault_server.faults = [Fault(path=p["url"], drop_after=cut, times=1)]
    d = make_device(firmware("1.0.0"), fault_server.url, aes_keys=[tmp_path / "k.aes"] if encrypt else [])
    d.config(timeout_s=1, progress_every=1)
    d.run()
    assert d.status()["version"] == "2.0.0", d.output
    ranges = [r.range for r in payload_requests(fault_server, p["url"])]
    assert ranges == [None, f"bytes={sizes[0] + sizes[1]}-"]


def test_a_compressed_download_that_keeps_dropping_resumes_in_a_later_update(fault_server, firmware, signer,
                                                                             make_device):
    rel = release.build(firmware("2.0.0", size=SIZE), fault_server.root, [signer], compress=True, chunk=16 * 1024)
    p = rel.manifest["payload"]
    sizes = [c[0] for c in p["chunks"]]
    # two chunks arrive, then every reconnect breaks at once
    fault_server.faults = [Fault(path=p["url"], drop_after=sizes[0] + sizes[1] + 100, times=1),
                           Fault(path=p["url"], drop_after=100)]
    d = make_device(firmware("1.0.0"), fault_server.url)
    d.config(timeout_s=1, progress_every=1)
    d.run()
    assert d.status()["last_error"] == "truncated", d.output
    assert d.state()["progress"]["chunk"] == 2
    fault_server.faults = []
    fault_server.requests.clear()
    d.run()
    assert d.status()["version"] == "2.0.0", d.output
    assert payload_requests(fault_server, p["url"])[0].range == f"bytes={sizes[0] + sizes[1]}-"
