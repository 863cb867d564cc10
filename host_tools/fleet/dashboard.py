"""The dashboard: server-rendered HTML (Jinja2 templates in templates/, autoescaped), charts as
inline SVG drawn here, one stylesheet from /static; no JavaScript, nothing from another host.
Every figure on a page comes with the JSON path of the admin API that holds it.
"""
from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import HTMLResponse

from . import monitor, views

_env = Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
                   autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
_env.filters["iso"] = lambda t: (views.iso(t) or "-").replace("T", " ").replace("Z", "")
_env.filters["pct"] = lambda r: "-" if r is None else f"{r:.0%}" if r >= 0.1 or r == 0 else f"{r:.1%}"
_env.filters["secs"] = lambda s: "-" if s is None else f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" \
    if s < 7200 else f"{s / 3600:.1f} h"

_env.filters["bp"] = lambda bp: f"{bp / 100:g} %"

SERIES = (("installed", "installed", "#2f6fb0"), ("confirmed", "confirmed", "#2e8b57"),
          ("rolled_back", "rolled back", "#c0392b"), ("failed_silent", "failed-silent", "#d68910"))


def _html(template: str, status: int = 200, **ctx) -> HTMLResponse:
    return HTMLResponse(_env.get_template(template).render(**ctx), status_code=status)


def login(*, wrong: bool, status: int) -> HTMLResponse:
    return _html("login.html", status, wrong=wrong)


def chart(prog: dict, width: int = 640, height: int = 220) -> dict | None:
    """Polylines (SVG coordinates) of a release's cumulative progress over time."""
    ts, series = prog["t"], prog["series"]
    if not ts:
        return None
    top = max([1] + [max(v) for v in series.values()])
    x0, y0, w, h = 48, 12, width - 60, height - 44
    t0, t1 = ts[0], ts[-1]

    def xy(t, v):
        return f"{x0 + w * (t - t0) / (t1 - t0):.1f},{y0 + h - h * v / top:.1f}"
    lines = [{"key": k, "label": label, "color": color, "last": series[k][-1],
              "points": " ".join(xy(t, v) for t, v in zip(ts, series[k]))} for k, label, color in SERIES]
    return {"width": width, "height": height, "x0": x0, "y0": y0, "w": w, "h": h, "top": top,
            "start": t0, "end": t1, "lines": lines}


def rollouts_page(doc: dict) -> HTMLResponse:
    return _html("rollouts.html", doc=doc, snap=None)


def rollout_page(st: dict | None) -> HTMLResponse:
    if st is None:
        return _html("missing.html", 404, what="rollout", snap=None)
    from .rollout import MAX_EXCLUDE
    return _html("rollout.html", r=st["rollout"], cfg=st["config"], stages=st["stages"], totals=st["totals"],
                 test=st["test"], regression=st["regression"], decision=st["decision"], failures=st["failures"],
                 history=st["history"], cfg_exclude=MAX_EXCLUDE, snap=None)


def overview(snap: views.Snapshot, store, release: str | None = None) -> HTMLResponse:
    rel = snap.releases()
    names = [r["release"] for r in rel["releases"]]
    chosen = release if release in names else (names[0] if names else None)
    rows = [a for a in snap.rows if a["release"] == chosen]
    failures = store.events(event=views.FAILURE_EVENTS, limit=20)
    stats = views.stats(store)
    return _html("overview.html", snap=snap, matrix=monitor.fleet_matrix(snap.devices), releases=rel,
                 chosen=chosen, chart=chart(monitor.progress(rows, snap.by_id, snap.now)),
                 failures=failures, anomalies=snap.anomalies()["anomalies"], status_counts=snap.status_counts(),
                 stats=stats, total=len(snap.devices), rollouts=store.rollouts()[:10])


def release_page(snap: views.Snapshot, version: str) -> HTMLResponse:
    rel = next((r for r in snap.releases()["releases"] if r["release"] == version), None)
    if rel is None:
        return _html("missing.html", 404, what=f"release {version}", snap=snap)
    rows = [a for a in snap.rows if a["release"] == version]
    tests = [t for t in monitor.regressions(snap.rows) if t["release"] == version]
    return _html("release.html", snap=snap, rel=rel, rows=sorted(rows, key=lambda a: a["device"]), tests=tests,
                 chart=chart(monitor.progress(rows, snap.by_id, snap.now)))


def device_page(detail: dict | None) -> HTMLResponse:
    if detail is None:
        return _html("missing.html", 404, what="device", snap=None)
    return _html("device.html", d=detail["device"], attempts=detail["attempts"], events=detail["events"],
                 now=detail["now"])
