"""Hypothesis-driven fuzzing of the device's parsers, run in the real micropython binary (.mpy,
128 KiB heap): DSSE envelopes, manifest bodies, raw HTTP responses and ota_config.json. Every
input must end in a result or a stable error code: no other exception, no MemoryError."""
from __future__ import annotations

import base64
import json
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import run_micropython
from mpota import dsse, keys

HARNESS = r"""
import os
import sys
from binascii import unhexlify
from ota.errors import OtaError
from ota import envelope, manifest, http, config, state, image
f = open(sys.argv[1])
keys = [unhexlify(f.readline().strip())]
while True:
    line = f.readline()
    if not line:
        break
    kind, _, data = line.strip().partition(" ")
    try:
        if kind == "envelope":
            envelope.open_envelope(unhexlify(data), keys)
            r = "ok"
        elif kind == "manifest":
            manifest.parse(unhexlify(data))
            r = "ok"
        elif kind == "image":
            image.check_first_block(unhexlify(data), 0, "1.0.0")
            r = "ok"
        elif kind == "state":
            for path in state.PATHS:  # an earlier agent's state file, as it is
                try:
                    os.remove(path)
                except OSError:
                    pass
            with open(state.LEGACY, "wb") as g:
                g.write(unhexlify(data))
            st = state.load()
            # what the agent does with it: look up and add a rejection, compare the floor, save
            state.rejected_reason(st, "d")
            state.reject(st, "d", "1.0", "x")
            (st["floor"] > 0, (st.get("progress") or {}).get("done", 0) >= 0, (st["pending"] or {}).get("slot"))
            state.save(st)
            r = "ok"
        elif kind == "config":
            with open(config.PATH, "wb") as g:
                g.write(unhexlify(data))
            config.load()
            r = "ok"
        else:
            resp = http.get(data, 2)
            buf = bytearray(512)
            while http.read_full(resp, memoryview(buf)) == 512:
                pass
            resp.close()
            r = "ok"
    except OtaError as e:
        r = "code:" + e.code
    except Exception as e:
        r = "CRASH:" + repr(e)
    print(r)
"""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    d = tmp_path_factory.mktemp("k")
    keys.generate(d / "k")
    return keys.load_private(d / "k")


# Each example runs a whole batch of cases in one micropython process, so a few examples do.
FUZZ = settings(max_examples=6, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])


def json_cases(kind, docs, raw=()):
    # harness lines for JSON documents and for raw bytes
    return [[kind, json.dumps(d).encode().hex()] for d in docs] + [[kind, r.hex()] for r in raw]


def run(agent, tmp_path, cases, signer):
    # One case per line, read one at a time: the harness holds no more than the agent would.
    pub = keys.raw_public(signer.public_key()).hex()
    f = tmp_path / "cases.txt"
    f.write_text(pub + "\n" + "".join(f"{kind} {data}\n" for kind, data in cases))
    out = run_micropython(HARNESS, f, path=f".frozen:{agent}", tmp_path=tmp_path, heap="128K", cwd=tmp_path,
                          timeout=120)
    lines = out.splitlines()
    assert len(lines) == len(cases), out[-2000:]
    crashes = [(c, line) for c, line in zip(cases, lines) if not (line == "ok" or line.startswith("code:"))]
    assert not crashes, crashes[:3]
    return lines


VALID_BODY = {"schema": 1, "version": "2.0.0", "board": "esp32", "chip": "esp32", "security_counter": 0,
              "image": {"size": 100, "sha256": "ab" * 32},
              "payload": {"url": "fw.bin", "size": 100, "sha256": "ab" * 32, "encoding": "raw"}, "critical": []}

body_mutations = (st.fixed_dictionaries({}, optional={k: json_values for k in VALID_BODY}).map(
    lambda d: {**VALID_BODY, **d}) | st.builds(
    lambda p: {**VALID_BODY, "payload": {**VALID_BODY["payload"], **p}},
    st.dictionaries(st.sampled_from(["url", "size", "sha256", "encoding", "chunk", "chunks", "wbits", "encryption"]),
                    json_values, max_size=4))).filter(
    lambda b: len(json.dumps(b)) < 3000)  # a signed body reaching parse() fits a 4 KiB manifest


@FUZZ
@given(bodies=st.lists(body_mutations, min_size=30, max_size=30),
       raw=st.lists(st.binary(max_size=300), min_size=10, max_size=10))
def test_manifest_bodies(agent, tmp_path, signer, bodies, raw):
    cases = json_cases("manifest", bodies, raw)
    run(agent, tmp_path, cases, signer)


@FUZZ
@given(envs=st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["payloadType", "payload", "signatures"]), json_values, max_size=3),
    st.builds(lambda sigs: {"payloadType": dsse.PAYLOAD_TYPE, "payload": base64.b64encode(b"{}").decode(),
                            "signatures": sigs},
              st.lists(st.dictionaries(st.sampled_from(["keyid", "sig"]), json_values | st.text(max_size=90)),
                       max_size=10))), min_size=20, max_size=20),
       cuts=st.lists(st.integers(0, 600), min_size=10, max_size=10),
       raw=st.lists(st.binary(max_size=200), min_size=5, max_size=5))
def test_envelopes(agent, tmp_path, signer, envs, cuts, raw):
    good = dsse.sign(json.dumps(VALID_BODY).encode(), [signer])
    # the documents, truncations of a valid envelope, raw bytes, then the valid one itself
    cases = json_cases("envelope", envs, [good[:c] for c in cuts] + raw + [good])
    lines = run(agent, tmp_path, cases, signer)
    assert lines[-1] == "ok"  # and the untouched one verifies


DEEP = [b"[" * 2040 + b"]" * 2040, b'{"a":' * 800 + b"1" + b"}" * 800, b"[" * 4000,
        b'["' + b"[" * 3000 + b'"]']  # brackets inside a string do not nest


def test_deeply_nested_json(agent, tmp_path, signer):
    # MicroPython's JSON parser runs out of heap on thousands of levels (4 KiB is enough): a
    # hostile document, not a lack of memory. Every document the agent parses is covered.
    cases = [[kind, d.hex()] for d in DEEP for kind in ("envelope", "manifest", "config", "state")]
    lines = run(agent, tmp_path, cases, signer)
    codes = {kind: lines[i] for i, (kind, _) in enumerate(cases) if i < 4}
    assert codes == {"envelope": "code:bad-envelope", "manifest": "code:bad-manifest", "config": "code:bad-config",
                     "state": "ok"}, lines  # a bad state file is replaced by a fresh one
    assert "code:no-memory" not in lines


VALID_CONFIG = {"server": "http://h:8000/", "pubkeys": ["11" * 32], "board": "esp32", "chip": "esp32",
                "device_id": "d", "timeout_s": 10}
config_mutations = st.fixed_dictionaries({}, optional={
    k: json_values for k in [*VALID_CONFIG, "mirrors", "ca", "aes_keys", "progress_every"]}).map(
    lambda d: {**VALID_CONFIG, **d})


@FUZZ
@given(configs=st.lists(config_mutations, min_size=30, max_size=30),
       raw=st.lists(st.binary(max_size=300), min_size=5, max_size=5))
def test_configs(agent, tmp_path, signer, configs, raw):
    (tmp_path / "ca.der").write_bytes(b"0" * 100)  # a readable file for "ca" values that name it
    cases = json_cases("config", configs, raw)
    lines = run(agent, tmp_path, cases + json_cases("config", [VALID_CONFIG]), signer)
    assert lines[-1] == "ok"  # and the valid one loads


scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8)
records = st.dictionaries(st.sampled_from(["digest", "version", "slot", "counter", "sector", "done", "chunk"]),
                          scalars, max_size=7)
state_values = st.fixed_dictionaries({}, optional={
    k: scalars | records | st.lists(scalars | records, max_size=3)
    for k in ["last_result", "last_error", "detail", "pending", "progress", "retried", "retry_after", "rejected",
              "floor"]})


@FUZZ
@given(states=st.lists(state_values, min_size=30, max_size=30),
       raw=st.lists(st.binary(max_size=200), min_size=5, max_size=5))
def test_state_files(agent, tmp_path, signer, states, raw):
    cases = json_cases("state", states, raw)
    run(agent, tmp_path, cases, signer)


def first_block(version: bytes, chip: int, secure: int, cut: int) -> bytes:
    # an app image's first bytes: header (magic, chip id), then esp_app_desc_t at 32
    b = bytearray(256)
    b[0] = 0xE9
    b[12:14] = chip.to_bytes(2, "little")
    b[32:40] = (0xABCD5432).to_bytes(4, "little") + secure.to_bytes(4, "little")
    b[48:80] = version[:32].ljust(32, b"\0")
    return bytes(b[:cut])


@FUZZ
@given(blocks=st.lists(st.builds(first_block, st.binary(max_size=32) | st.just(b"1.0.0"), st.sampled_from([0, 2, 9]),
                                 st.integers(0, 2**32 - 1), st.integers(0, 256)), min_size=30, max_size=30),
       raw=st.lists(st.binary(max_size=120), min_size=5, max_size=5))
def test_first_blocks(agent, tmp_path, signer, blocks, raw):
    # what a server (not the signer) can put in front of the agent before the hash is complete
    cases = [["image", b.hex()] for b in blocks + raw]
    lines = run(agent, tmp_path, cases + [["image", first_block(b"1.0.0", 0, 0, 256).hex()]], signer)
    assert lines[-1] == "ok"


class RawServer:
    """Answers each connection with the next canned response, byte for byte."""

    def __init__(self, responses):
        self.responses = list(responses)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.stopped = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def stop(self):
        # The port must really be free afterwards: a later test's server may get it.
        self.stopped = True
        self.thread.join(5)
        self.sock.close()

    def serve(self):
        for data in self.responses:
            conn = None
            while conn is None and not self.stopped:
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
            if conn is None:
                return
            try:
                conn.settimeout(2)
                conn.recv(4096)
                conn.sendall(data)
            except OSError:
                pass
            finally:
                conn.close()


header_line = st.one_of(
    st.sampled_from([b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: x", b"Content-Length: 99999999999",
                     b"Transfer-Encoding: chunked", b"Location: /", b"Location: http://", b"Location: ftp://x/",
                     b"Content-Range: bytes 0-1/2", b"Retry-After: soon", b": empty", b"NoColon"]),
    st.binary(max_size=80).filter(lambda b: b"\n" not in b))
responses = st.builds(
    lambda status, headers, body: status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body,
    st.sampled_from([b"HTTP/1.0 200 OK", b"HTTP/1.1 206 Partial", b"HTTP/1.0 302 Found", b"HTTP/1.0 503 Busy",
                     b"HTTP/1.0 abc", b"HTTP/1.0", b"", b"ICY 200 OK"]) | st.binary(max_size=40),
    st.lists(header_line, max_size=6), st.binary(max_size=600)) | st.binary(max_size=400)


@settings(FUZZ, max_examples=5)
@given(resps=st.lists(responses, min_size=25, max_size=25))
def test_http_responses(agent, tmp_path, signer, resps):
    # A redirect answered from the same canned list would consume extra connections; each
    # case gets a fresh server so counts line up.
    servers = [RawServer([r] * 4) for r in resps]
    try:
        run(agent, tmp_path, [["http", f"http://127.0.0.1:{s.port}/m"] for s in servers], signer)
    finally:
        for s in servers:
            s.stop()
