"""ota_state.json written by another agent version or edited by hand: a field of the wrong type
must not make every later update fail. The agent resets that field and goes on updating."""
from __future__ import annotations

import json

import pytest

D = "ab" * 32
CASES = {
    "rejected not a list": {"rejected": 5},
    "rejected entries junk": {"rejected": [1, "x", None, {"version": "9"}, {"digest": 7}]},
    "pending a string": {"pending": "2.0.0"},
    "pending wrong types": {"pending": {"digest": 1, "version": None, "slot": ["ota_1"], "sector": "a"}},
    "progress a list": {"progress": [1, 2]},
    "progress negative": {"progress": {"digest": D, "slot": "ota_1", "done": -4096}},
    "floor a string": {"floor": "3"},
    "floor negative": {"floor": -1},
    "detail a number": {"detail": 5, "last_result": 3, "last_error": ["x"]},
    "retried a dict": {"retried": {"a": 1}, "retry_after": "soon"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_garbled_state_file_does_not_stop_updates(case, firmware, make_device, server, signer):
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("1.0.0"), server.url)
    (d.dev.fs / "ota_state.json").write_text(json.dumps(CASES[case]))
    d.run()
    st = d.status()
    assert st["version"] == "2.0.0" and st["last_error"] is None, d.output
    assert "internal-error" not in d.output and "Traceback" not in d.output
