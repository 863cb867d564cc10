"""Versions (docs/versions.md): one rule on the host (mpota.release) and on the device
(ota/manifest.py, run as .mpy in the real micropython binary), checked against one table of
ordered, equal and refused versions, and against each other on random pairs (hypothesis)."""
from __future__ import annotations

import subprocess
import sys
from functools import cmp_to_key
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import agent_lines
from mpota import release

# Strictly increasing; the versions within a row are equal (semver 2.0.0, section 11, with the
# additions of docs/versions.md: a leading "v", 1 to 4 numbers, `git describe` suffixes).
ORDERED = [
    ["0", "0.0.0", "v0.0.0.0"],
    ["0.0.1-alpha"],
    ["0.0.1"],
    ["0.9.99"],
    ["1.0.0-0"],
    ["1.0.0-1"],
    ["1.0.0-2"],
    ["1.0.0-10"],                      # numbers by value, not as text
    ["1.0.0-1073741823"],              # the largest number
    ["1.0.0--"],                       # numbers below words; "-" (0x2D) is the lowest word character
    ["1.0.0-0a"],
    ["1.0.0-3-gABCD"],                 # not git describe (upper-case hash): a word, "3-gABCD"
    ["1.0.0-3-gabc"],                  # not git describe either (hash under 4 digits)
    ["1.0.0-A"],                       # ASCII: upper case below lower case
    ["1.0.0-Z"],
    # semver 2.0.0's own example
    ["1.0.0-alpha"],
    ["1.0.0-alpha.1"],
    ["1.0.0-alpha.beta"],
    ["1.0.0-beta"],
    ["1.0.0-beta.2"],
    ["1.0.0-beta.11"],
    ["1.0.0-gabcd"],                   # no commit count: a word
    ["1.0.0-rc.1", "1.0.0-rc.1+build.7", "1.0.0-rc.1-dirty", "1.0.0-rc.1-2-gdeadbeef"],
    ["1.0.0-x", "1.0.0-x-3-gabcd"],    # git describe after tag 1.0.0-x
    ["1.0.0", "v1.0.0", "V1.0.0", "1.0", "1", "1.0.0.0", "01.00.000", "1.0.0+build.5", "1.0.0+20240101.sha-1",
     "v1.0.0-dirty", "1.0.0-3-gabc1234", "v1.0.0-3-gabc1234-dirty", "1.0.0-0-g0000", "1.0.0-12-gabcd+x"],
    ["1.0.0.1"],
    ["1.0.1-0"],
    ["1.0.1"],
    # MicroPython's own development versions (dots, not git describe's hyphens): pre-releases
    ["v1.24.0-preview.99.g1234abcd"],
    ["v1.24.0-preview.123.gabcdef01"],
    ["1.24.0", "v1.24.0"],
    ["1.24.1", "v1.24.1", "v1.24.1-dirty", "v1.24.1-3-gabc1234", "v1.24.1-3-gabc1234-dirty"],
    ["1.1073741823.0"],
    # release candidates: "rc.N" orders by N; "rcN" is one word, ordered as text
    ["2.0.0-rc.1"],
    ["2.0.0-rc.2"],
    ["2.0.0-rc.10"],
    ["2.0.0-rc1", "v2.0.0-rc1-5-g0123abcd-dirty"],
    ["2.0.0-rc10"],
    ["2.0.0-rc2"],
    ["2.0.0"],
    ["1073741823.1073741823.1073741823.1073741823"],
]

# Refused everywhere (host: ReleaseError "bad-version"; device: not a version)
BAD = [
    "", "v", "V", "vv1.0.0", "x1.0.0", "1.0.0-", "1.0.0+", "-1.0.0", "+1.0.0", "1.0.0-a..b", "1.0.0-.a", "1.0.0-a.",
    "1.0.0+a..b", "1.0.0++b", "1.0.0-a+b+c", "1..0", ".1", "1.", "1.2.3.4.5", "1.0.0-rc_1", "1.0.0 rc1", " 1.0.0",
    "1.0.0 ", "1.0.0\n", "1.0.0\x00", "1,0", "0x10", "1e3", "1.-1", "1.+1", "1.0.0-01", "1.0.0-rc.00",
    "1.0.0-alpha.007", "1" * 40, "1." + "9" * 40, "1.0.0-" + "1" * 40, "1.1073741824", "1073741824",
    "1.0.0-1073741824", "99999999999", "1.0.0-a.b.c.d.e.f.g.h.i", "1.0.0-" + "a" * 59, "1" * 65,
    "1.0.0-\u03b1", "\u0661.0.0", "1.0.\uff11", "1.0.0-\u00e9", "1.0.0+\u00e9", "\ud7ff1.0",
    "-dirty", "v-3-gabcd", "abc1234", "1.0.0/2",
]
# At the limits and still versions: 64 characters, 8 pre-release identifiers, 10 digits, empty build
# identifiers are not allowed but a hyphen-only one is.
GOOD_EDGES = ["1.0.0-" + "a" * 58, "1.0.0-a.b.c.d.e.f.g.h", "0000000001.0", "1.0.0+0001.-", "1.0.0-a-b"]


def _sign(x):
    return (x > 0) - (x < 0)


def host_cmp(a, b):
    """-1 / 0 / 1, or "x" when a is not a version, "y" when b is not: what the device prints."""
    for v, tag in ((a, "x"), (b, "y")):
        try:
            release.parse_version(v)
        except release.ReleaseError as e:
            assert e.code == "bad-version" and "not a version" in str(e) and "docs/versions.md" in e.hint
            return tag
    return release.compare_versions(a, b)


# The device's side: one pair per line (JSON), read one at a time; prints what host_cmp returns.
HARNESS = r"""
from ota.manifest import parse_version, running_version
for a, b in cases():
    ka = parse_version(a)
    kb = parse_version(b)
    if ka is None:
        print("x")
    elif kb is None:
        print("y")
    else:
        print((ka > kb) - (ka < kb))
"""


def device_cmp(agent, tmp_path, pairs):
    lines = agent_lines(HARNESS, agent, tmp_path, pairs, heap="64K", timeout=120)
    return [int(x) if x not in ("x", "y") else x for x in lines]


def table_pairs():
    flat = [(i, v) for i, row in enumerate(ORDERED) for v in row]
    return [((a, b), _sign(i - j)) for i, a in flat for j, b in flat]


def test_the_table_is_what_it_says():
    assert len(ORDERED) == len({r[0] for r in ORDERED})
    assert sum(map(len, ORDERED)) == len({v for r in ORDERED for v in r})


def test_host_orders_the_table():
    for (a, b), want in table_pairs():
        assert host_cmp(a, b) == want, (a, b)
    # and sorting by the key gives the table back
    flat = [v for row in ORDERED for v in row]
    keyed = sorted(reversed(flat), key=cmp_to_key(release.compare_versions))
    assert [release.parse_version(v) for v in keyed] == [release.parse_version(v) for v in flat]


def test_device_orders_the_table(agent, tmp_path):
    cases = table_pairs()
    got = device_cmp(agent, tmp_path, [p for p, _ in cases])
    wrong = [(p, want, g) for (p, want), g in zip(cases, got) if g != want]
    assert not wrong, wrong[:5]


def test_malformed_and_hostile_versions_are_refused_on_both_sides(agent, tmp_path):
    for v in BAD:
        with pytest.raises(release.ReleaseError) as e:
            release.parse_version(v)
        assert e.value.code == "bad-version", v
    for v in GOOD_EDGES:
        release.parse_version(v)
    pairs = [[v, "1.0.0"] for v in BAD] + [["1.0.0", v] for v in BAD] + [[v, v] for v in GOOD_EDGES]
    got = device_cmp(agent, tmp_path, pairs)
    assert got == ["x"] * len(BAD) + ["y"] * len(BAD) + [0] * len(GOOD_EDGES), list(zip(pairs, got))


def test_semver_precedence_examples():
    # the rules one by one (semver 2.0.0, 11.1 to 11.4)
    newer = release.is_newer
    assert newer("2.0.0", "2.0.0-rc1") and not newer("2.0.0-rc1", "2.0.0")
    assert newer("1.0.0-alpha.1", "1.0.0-alpha") and newer("1.0.0-alpha.beta", "1.0.0-alpha.1")
    assert newer("1.0.0-beta.11", "1.0.0-beta.2") and newer("1.0.0-rc2", "1.0.0-rc10")
    assert release.compare_versions("v1.24.1", "1.24.1") == 0
    assert release.compare_versions("1.0.0+a", "1.0.0+b") == 0
    assert release.compare_versions("2.0", "2.0.0.0") == 0


def test_git_describe_suffixes():
    d = release.describe_suffix
    assert d("v1.24.1-3-gabc1234-dirty") == "-3-gabc1234-dirty" and d("v1.24.1-dirty") == "-dirty"
    assert d("1.24.1-3-gabc1234") == "-3-gabc1234" and d("2.0.0-rc1-5-g0123abcd+meta") == "-5-g0123abcd"
    # not git describe: semver pre-releases, MicroPython's dotted form, too short a hash, upper case
    for v in ("2.0.0-rc1", "1.0.0-3-gabc", "1.0.0-3-gABCD", "v1.24.0-preview.123.gabcdef01", "1.0.0-gabcd",
              "1.0.0+dirty", "1.0.0-dirty.1"):
        assert d(v) == "", v


def test_the_key_is_small():
    # a flat tuple of small ints and short strings: cheap to keep on the device
    k = release.parse_version("1.0.0-a.b.c.d.e.f.g.h")
    assert len(k) == 4 + 1 + 2 * 8 and all(isinstance(x, int) and 0 <= x < 2**30 or isinstance(x, str) for x in k)


# ---- host and device agree on random pairs ------------------------------------------------------

def _join(v, core, pre, describe, build):
    return (v + ".".join(core) + ("-" + ".".join(pre) if pre is not None else "") + describe
            + ("+" + ".".join(build) if build is not None else ""))


_prefix = st.sampled_from(["", "", "v", "V"])
_describe = st.sampled_from(["", "", "", "-dirty", "-3-gabc1234", "-12-gdeadbeef-dirty"])
# Versions, most of them close to each other (small numbers, few words), so that equal and
# neighbouring ones meet often ...
_small = st.integers(0, 3).map(str)
_good_id = st.one_of(_small, st.sampled_from(["10", "1073741823", "alpha", "beta", "rc", "rc1", "rc10", "A", "-",
                                              "0a", "dirty", "g1234"]))
_valid = st.builds(_join, _prefix, st.lists(_small, min_size=1, max_size=4),
                   st.none() | st.lists(_good_id, min_size=1, max_size=8), _describe,
                   st.none() | st.lists(st.sampled_from(["1", "01", "b", "-"]), min_size=1, max_size=2))
# ... near misses at every limit ...
_num = st.one_of(st.integers(0, 20).map(str), st.sampled_from(["00", "01", "1073741824", "9" * 10, "9" * 40]))
_ident = st.one_of(_num, st.sampled_from(["", "\u00e9", "_", "a b"]), st.text("0123456789abcgxyzAZ-", max_size=6))
_near = st.builds(_join, _prefix, st.lists(_num, min_size=0, max_size=5), st.none() | st.lists(_ident, max_size=9),
                  st.sampled_from(["", "-1-gabc", "-x-gabcd", "-3-gABCD", "-dirty-dirty"]),
                  st.none() | st.lists(_ident, max_size=3))
# ... and noise.
_noise = st.text("0123456789.-+vVagdirty \u0661", max_size=70)
_any = st.one_of(_valid, _valid, _valid, _near, _noise)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.large_base_example])
@given(versions=st.lists(_any, min_size=40, max_size=40))
def test_host_and_device_agree_on_random_pairs(agent, tmp_path, versions):
    # Every pair of 40 random versions (itself included), in one micropython run per example.
    pairs = [[a, b] for a in versions for b in versions]
    got = device_cmp(agent, tmp_path, pairs)
    want = [host_cmp(a, b) for a, b in pairs]
    wrong = [(p, w, g) for p, w, g in zip(pairs, want, got) if w != g]
    assert not wrong, wrong[:5]


# ---- the device's decision: running version against a release -----------------------------------

DECIDE = r"""
from ota.errors import OtaError
from ota.manifest import parse, decide
class Cfg:
    chip = board = "esp32"
    aes_keys = {}
for running, body in cases():
    try:
        print("install" if decide(parse(json.dumps(body)), Cfg, running, 0, 1 << 20) else "up-to-date")
    except OtaError as e:
        print(e.code)
"""

BODY = {"schema": 1, "board": "esp32", "chip": "esp32", "security_counter": 0,
        "image": {"size": 100, "sha256": "ab" * 32},
        "payload": {"url": "fw.bin", "size": 100, "sha256": "ab" * 32, "encoding": "raw"}}

DECISIONS = [
    # running, release, what the device does
    ("2.0.0-rc1", "2.0.0", "install"),
    ("2.0.0", "2.0.0-rc1", "downgrade"),
    ("2.0.0-rc1", "2.0.0-rc2", "install"),
    ("2.0.0-rc1", "2.0.0-rc.1", "downgrade"),       # "rc" < "rc1": use one style of pre-release
    ("2.0.0-rc.9", "2.0.0-rc.10", "install"),
    ("v1.24.1", "1.24.1", "up-to-date"),
    ("1.24.1+build.1", "1.24.1+build.2", "up-to-date"),
    # a build after a tag, or from a changed tree, runs as its tag
    ("v1.24.1-3-gabc1234-dirty", "1.24.1", "up-to-date"),
    ("v1.24.1-dirty", "v1.24.1", "up-to-date"),
    ("v1.24.1-3-gabc1234", "1.24.2-rc.1", "install"),
    ("v1.24.1-3-gabc1234", "1.24.1-rc.1", "downgrade"),
    ("v1.24.1-3-gabc1234", "1.24.0", "downgrade"),
    ("1.24.1", "v1.24.1-5-gdef5678", "up-to-date"),
    # no version, or none we can order: below every release (stock MicroPython leaves it empty)
    ("", "0.0.0-0", "install"),
    (None, "0.0.1", "install"),
    ("abc1234", "0.0.1", "install"),                # git describe --always, no tag
    ("1.0.0-01", "0.0.1", "install"),
    # a release version that is not one
    ("1.0.0", "1.0.0-01", "bad-version"),
    ("1.0.0", "1" * 40, "bad-version"),
    ("1.0.0", "2.0.0-" + "a" * 60, "bad-version"),
    ("1.0.0", 2, "bad-manifest"),
    ("1.0.0", None, "bad-manifest"),
]


def test_the_device_decides_by_the_rule(agent, tmp_path):
    got = agent_lines(DECIDE, agent, tmp_path, [[run, dict(BODY, version=rel)] for run, rel, _ in DECISIONS],
                      heap="64K")
    assert [(r, v, g) for (r, v, _), g in zip(DECISIONS, got)] == [(r, v, w) for r, v, w in DECISIONS]


# ---- end to end: the real agent on the simulated ESP32 -------------------------------------------

def test_a_release_candidate_takes_the_release(server, firmware, signer, make_device):
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("2.0.0-rc1"), server.url)
    boots = d.run()
    assert [b.version for b in boots] == ["2.0.0-rc1", "2.0.0", "2.0.0"], d.output
    st = d.status()
    assert st["version"] == "2.0.0" and st["slot"] == "ota_1" and st["last_error"] is None


def test_a_release_refuses_its_release_candidate_as_a_downgrade(server, firmware, signer, make_device):
    server.publish(firmware("2.0.0-rc1"), signer)
    d = make_device(firmware("2.0.0"), server.url)
    before = d.otadata()
    boots = d.run()
    assert [b.exit for b in boots] == ["idle"], d.output
    st = d.status()
    assert st["last_error"] == "downgrade" and st["version"] == "2.0.0" and st["slot"] == "ota_0"
    assert "release 2.0.0-rc1 is older than running 2.0.0" in st["detail"]
    assert d.otadata() == before and d.slot_bytes(1, 1) == b"\xff"


def test_a_git_describe_build_runs_as_its_tag(server, firmware, signer, make_device):
    # 3 commits after v2.0.0, uncommitted changes: the release 2.0.0 is nothing to do, 2.0.1 is newer
    server.publish(firmware("2.0.0"), signer)
    d = make_device(firmware("v2.0.0-3-gabc1234-dirty"), server.url)
    assert [b.exit for b in d.run()] == ["idle"] and "up to date" in d.output, d.output
    server.publish(firmware("2.0.1"), signer)
    boots = d.run()
    assert [b.version for b in boots] == ["v2.0.0-3-gabc1234-dirty", "2.0.1", "2.0.1"], d.output


# ---- mpota release -------------------------------------------------------------------------------

def _mpota(*args):
    return subprocess.run([str(Path(sys.executable).parent / "mpota"), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = tmp_path_factory.mktemp("kit")
    assert _mpota("keygen", d / "release").returncode == 0
    for v in ("2.0.0-rc1", "2.0.0", "v2.0.0-3-gabc1234-dirty", "v2.0.0-dirty", "1.0.0-rc.01"):
        r = _mpota("sim", "firmware", d / f"fw-{v}.bin", "--version", v, "--size", "32K")
        assert r.returncode == 0, r.stderr
    return d


def test_release_orders_pre_releases(kit, tmp_path):
    out = tmp_path / "rel"
    for v in ("2.0.0-rc1", "2.0.0"):
        r = _mpota("release", kit / f"fw-{v}.bin", "--key", kit / "release", "--out", out)
        assert r.returncode == 0, r.stderr
    r = _mpota("release", kit / "fw-2.0.0-rc1.bin", "--key", kit / "release", "--out", out)
    assert r.returncode == 2 and "already holds 2.0.0; 2.0.0-rc1 is older" in r.stderr, r.stderr


def test_release_refuses_a_git_describe_version_unless_forced(kit, tmp_path):
    out = tmp_path / "rel"
    r = _mpota("release", kit / "fw-v2.0.0-3-gabc1234-dirty.bin", "--key", kit / "release", "--out", out)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "v2.0.0-3-gabc1234-dirty is a `git describe` version (3 commit(s) after v2.0.0, uncommitted " \
           "changes): devices order it as v2.0.0" in r.stderr, r.stderr
    assert "hint: tag the commit" in r.stderr and "--force" in r.stderr
    assert not (out / "manifest.json").exists()
    r = _mpota("release", kit / "fw-v2.0.0-dirty.bin", "--key", kit / "release", "--out", out)
    assert r.returncode == 2 and "(tag v2.0.0, uncommitted changes)" in r.stderr, r.stderr
    r = _mpota("release", kit / "fw-v2.0.0-3-gabc1234-dirty.bin", "--key", kit / "release", "--out", out, "--force")
    assert r.returncode == 0, r.stderr
    assert "release: v2.0.0-3-gabc1234-dirty for board esp32" in r.stdout


def test_release_refuses_a_malformed_version(kit, tmp_path):
    for force in ((), ("--force",)):
        r = _mpota("release", kit / "fw-1.0.0-rc.01.bin", "--key", kit / "release", "--out", tmp_path / "rel", *force)
        assert r.returncode == 2 and "'1.0.0-rc.01' is not a version: pre-release number '01' has a leading zero" \
            in r.stderr and "docs/versions.md" in r.stderr, r.stderr
