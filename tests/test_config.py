"""A broken or hostile ota_config.json, run through the real agent: every case ends in
`bad-config` with a reason, the running firmware keeps running, the state file stays readable,
and nothing is fetched from any server."""
from __future__ import annotations

import json

import pytest

GOOD_KEY = "11" * 32

# (what to change in the provisioned config, a fragment of the reason the device gives)
CASES = {
    "not json": (b"{not json", "not readable JSON"),
    "over 4 KiB": (b'{"server": "http://h/", "pad": "' + b"x" * 5000 + b'"}', "not readable JSON"),
    "a list": (b"[1, 2]", "not a JSON object"),
    "no server": ({"server": None}, "http:// or https://"),
    "ftp server": ({"server": "ftp://h/"}, "http:// or https://"),
    "server a number": ({"server": 7}, "http:// or https://"),
    "mirrors a string": ({"mirrors": "http://m/"}, "mirrors must be a list"),
    "eight mirrors": ({"mirrors": ["http://m/"] * 8}, "at most 7"),
    "no keys": ({"pubkeys": []}, "pubkeys must list"),
    "nine keys": ({"pubkeys": [GOOD_KEY] * 9}, "pubkeys must list"),
    "short key": ({"pubkeys": ["11" * 31]}, "not 64 hex digits"),
    "key not hex": ({"pubkeys": ["zz" * 32]}, "not 64 hex digits"),
    "key a number": ({"pubkeys": [5]}, "not 64 hex digits"),
    "unknown chip": ({"chip": "esp8266"}, "unknown chip"),
    "aes key short": ({"aes_keys": ["22" * 16]}, "AES key is not 64 hex digits"),
    "five aes keys": ({"aes_keys": ["22" * 32] * 5}, "at most 4"),
    "timeout zero": ({"timeout_s": 0}, "timeout_s must be a whole number"),
    "timeout text": ({"timeout_s": "10"}, "timeout_s must be a whole number"),
    "progress huge": ({"progress_every": 10**9}, "progress_every must be"),
    "ca a number": ({"ca": 1}, "ca must name a file"),
    "ca missing": ({"ca": "nope.der"}, "cannot read the CA certificate"),
    "ca a directory": ({"ca": "lib"}, "CA certificate"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_config_is_refused_and_changes_nothing(case, firmware, make_device, server, signer):
    change, reason = CASES[case]
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    path = d.dev.fs / "ota_config.json"
    if isinstance(change, bytes):
        path.write_bytes(change)
    else:
        cfg = json.loads(path.read_text())
        cfg.update(change)
        path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    flash = d.flash()
    d.run()
    st = d.status()
    assert st["last_error"] == "bad-config", d.output
    assert reason in st["detail"], st["detail"]
    assert st["version"] == "1.0.0" and d.flash()[:0x10000] == flash[:0x10000]
    assert "Traceback" not in d.output
    assert d.state()["last_error"] == "bad-config"
    assert "GET" not in d.output  # nothing was asked of the server
