"""The dashboard in a real headless Chromium: the pages a person sees, asserted on the DOM that
Chromium rendered (--dump-dom), and screenshots of them in the test's tmp dir (the path is
printed). MPOTA_UPDATE_SCREENSHOT=1 also writes docs/fleet-dashboard.png (the README's picture);
without it no tracked file changes. Skips with the reason where Chromium is absent."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fleet_util import seed_fleet
from mpota.fleet.server import start_in_thread

ROOT = Path(__file__).resolve().parents[1]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


pytestmark = pytest.mark.skipif(_chromium() is None, reason="no chromium: apt-get install chromium "
                                                             "(.ci/run installs it as root)")


class Browser:
    """Headless Chromium with its own profile (so the sign-in cookie persists between calls)."""

    def __init__(self, profile: Path):
        self.profile = profile

    def _run(self, *args, timeout=90) -> subprocess.CompletedProcess:
        cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={self.profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def dom(self, url: str) -> str:
        r = self._run("--dump-dom", url)
        assert r.returncode == 0 and "<html" in r.stdout, r.stderr[-2000:]
        return r.stdout

    def screenshot(self, url: str, path: Path, size=(1280, 1700)):
        r = self._run(f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", url)
        assert path.exists() and path.stat().st_size > 10000, r.stderr[-2000:]


class Dom(HTMLParser):
    """The elements of a dumped DOM: tag, attributes and text inside, per element with an id or
    a data-* attribute (enough to ask 'which rows does the failures table show')."""

    def __init__(self, html: str):
        super().__init__()
        self.stack, self.found = [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": ""}
        if tag not in ("meta", "link", "input", "br", "img", "polyline", "rect"):
            self.stack.append(el)
        self.found.append(el)

    def handle_endtag(self, tag):
        while self.stack:
            el = self.stack.pop()
            if el["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self.stack:  # one space between text nodes: cells read apart
            el["text"] += data + " "

    def by(self, **attrs):
        return [e for e in self.found if all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def section(self, sid):
        [s] = self.by(id=sid)
        return " ".join(s["text"].split())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dash")
    srv = start_in_thread(str(tmp / "fleet.sqlite"))
    seed_fleet(srv.store, time.time())
    yield srv, tmp
    srv.stop()


@pytest.fixture(scope="module")
def browser(fleet):
    srv, tmp = fleet
    b = Browser(tmp / "profile")
    login = b.dom(srv.url + "/")  # not signed in: the form
    assert 'name="token"' in login and "Sign in" in login
    b.dom(srv.url + f"/?token={srv.token}")  # ?token= once: a cookie in the profile from then on
    return b


def test_overview_shows_the_fleet_releases_failures_and_anomalies(fleet, browser):
    srv, tmp = fleet
    dom = Dom(browser.dom(srv.url + "/"))
    assert "48 devices" in dom.section("summary")
    # fleet by version and board
    rows = {e["attrs"]["data-version"]: " ".join(e["text"].split()) for e in dom.by() if "data-version" in e["attrs"]}
    assert set(rows) == {"1.2.0", "1.1.0"}
    assert "esp32 esp32s3" in dom.section("fleet-matrix")
    # releases, newest first, with their counts
    rel = [e for e in dom.found if "data-release" in e["attrs"]]
    assert [e["attrs"]["data-release"] for e in rel] == ["1.2.0", "1.1.0"]
    assert " ".join(rel[0]["text"].split()).startswith("1.2.0 48 47 38 8 1 1 0")
    # the progress of the newest release: four series, ending at the counts of the table
    keys = {e["attrs"]["data-series"]: " ".join(e["text"].split()) for e in dom.by() if e["tag"] == "span"
            and "data-series" in e["attrs"]}
    assert keys == {"installed": "installed 47", "confirmed": "confirmed 38", "rolled_back": "rolled back 8",
                    "failed_silent": "failed-silent 1"}
    assert len([e for e in dom.found if e["tag"] == "polyline"]) == 4
    # recent failures with their codes
    fails = [" ".join(e["text"].split()) for e in dom.found if e["attrs"].get("class") == "failure"]
    assert fails and any("rolled-back health-failed" in f for f in fails)
    assert any("refused bad-signature" in f for f in fails)
    # anomalies of each kind
    kinds = {e["attrs"]["data-kind"] for e in dom.found if e["attrs"].get("class") == "anomaly"}
    assert kinds == {"regression", "boot-loop", "outlier", "failed-silent"}
    assert "Fisher" in dom.section("anomalies") and "esp32s3-01" in dom.section("anomalies")
    shot = tmp / "fleet-dashboard.png"
    browser.screenshot(srv.url + "/", shot)
    print(f"dashboard screenshot: {shot}")
    if os.environ.get("MPOTA_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "fleet-dashboard.png")
        print(f"wrote {ROOT / 'docs' / 'fleet-dashboard.png'}")


def test_release_and_device_pages(fleet, browser):
    srv, tmp = fleet
    dom = Dom(browser.dom(srv.url + "/releases/1.2.0"))
    text = dom.section("release")
    assert "48 devices tried it" in text and "8 rolled back" in text and "1 failed-silent" in text
    [alarm] = dom.by(data_alarm="true")
    assert "1.2.0 on esp32s3: 8 of 24 failed" in " ".join(alarm["text"].split())
    outcomes = [e["attrs"]["data-outcome"] for e in dom.found if "data-outcome" in e["attrs"]]
    assert outcomes.count("rolled-back") == 8 and outcomes.count("failed-silent") == 1
    assert "canary" in dom.section("groups") and "health-failed" in dom.section("groups")
    browser.screenshot(srv.url + "/releases/1.2.0", tmp / "release.png", size=(1280, 1200))
    dom = Dom(browser.dom(srv.url + "/devices/esp32-05"))
    assert dom.section("device-status") == "failed-silent"
    assert [e["attrs"]["data-event"] for e in dom.found if "data-event" in e["attrs"]][:2] == ["installed",
                                                                                              "downloading"]
    print(f"screenshots: {tmp / 'fleet-dashboard.png'}, {tmp / 'release.png'}")


def test_a_wrong_token_shows_the_form_again(fleet, tmp_path):
    srv, _ = fleet
    dom = Dom(Browser(tmp_path / "p").dom(srv.url + "/?token=wrong"))
    assert dom.by(id="login-error") and not dom.by(id="fleet-matrix")
