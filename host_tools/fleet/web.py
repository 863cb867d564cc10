"""The ASGI app (Starlette): POST /v1/reports for devices, the admin API behind a bearer token,
the dashboard, /healthz. Thin: it reads the request, calls protocol, storage and views, and
answers; storage calls run in worker threads so that a slow database never stalls the loop.

Every refusal is counted by reason in this process and added to the database's counters every
COUNT_FLUSH_S seconds (and at shutdown; /v1/admin/stats adds this process's first), so the
counts of all server processes add up without a database write per hostile request.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import MpotaError
from . import dashboard, protocol, rollouts, views
from .protocol import Refusal
from .storage import Store

COUNT_FLUSH_S = 1.0
ROLLOUT_INTERVAL_S = 10.0  # how often the rollouts are evaluated (mpota fleet serve --rollout-interval)
SECRET_TTL_S = 30.0      # a device's secret is read again after this
UNKNOWN_TTL_S = 2.0      # an unknown device is asked about again after this
SECRET_CACHE_SIZE = 200_000
COOKIE = "mpota_fleet"
log = logging.getLogger("mpota.fleet")


class Counts:
    """Refusal and report counters of this process, added to the database now and then."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}

    def add(self, name: str, k: int = 1):
        if k:
            with self._lock:
                self._pending[name] = self._pending.get(name, 0) + k

    def take(self) -> dict:
        with self._lock:
            out, self._pending = self._pending, {}
        return out

    def flush(self, store: Store):
        counts = self.take()
        try:
            store.add_counts(counts)
        except Exception:  # the database is away: keep the counts for the next flush
            for k, v in counts.items():
                self.add(k, v)
            raise


class Fleet:
    """What the handlers share: the store, the admin token, the body deadline, the counters."""

    def __init__(self, store: Store, token: str, body_timeout: float = protocol.BODY_TIMEOUT_S, rollout_key=None):
        self.store, self.token, self.body_timeout = store, token, body_timeout
        self.rollout_key = rollout_key  # the rollout role's private key (signs rollout.json), or None
        self.holder = rollouts.holder_id()
        self.counts = Counts()
        self.cookie_value = hmac.new(token.encode(), b"mpota fleet dashboard", hashlib.sha256).hexdigest()
        self._cache: dict = {}
        self._secrets: dict = {}  # device -> (secret or None, until): see secret()

    def secret(self, device: str) -> str | None:
        """A device's secret, from a short-lived cache: the MAC check of a flood of reports needs
        no database read each. Safe: ingest() checks the secret again inside its transaction
        (a rotated secret is bad-signature, an unregistered device unknown-device)."""
        now = time.monotonic()
        hit = self._secrets.get(device)
        if hit is not None and hit[1] > now:
            return hit[0]
        secret = self.store.secret(device)
        if len(self._secrets) > SECRET_CACHE_SIZE:
            self._secrets.clear()
        self._secrets[device] = (secret, now + (SECRET_TTL_S if secret else UNKNOWN_TTL_S))
        return secret

    def snapshot(self, max_age: float = 2.0) -> views.Snapshot:
        """The statistics, computed at most every max_age seconds (they read the whole fleet)."""
        hit = self._cache.get("snap")
        if hit is None or time.monotonic() - hit[0] > max_age:
            hit = (time.monotonic(), views.Snapshot(self.store))
            self._cache["snap"] = hit
        return hit[1]

    def authorized(self, request: Request, *, cookie_ok: bool) -> bool:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return hmac.compare_digest(auth[7:].strip().encode(), self.token.encode())
        c = request.cookies.get(COOKIE)
        return cookie_ok and c is not None and hmac.compare_digest(c.encode(), self.cookie_value.encode())


def _json(obj, status=200, headers=None) -> Response:
    return JSONResponse(_clean(obj), status_code=status, headers=headers)


def _clean(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise Refusal("too-large")
                chunks.append(chunk)
    except TimeoutError:
        raise Refusal("slow-client", f"the body did not arrive within {timeout:g} s") from None
    return b"".join(chunks)


# ---- devices --------------------------------------------------------------------------------
async def post_reports(request: Request) -> Response:
    fleet: Fleet = request.app.state.fleet
    try:
        cl = request.headers.get("content-length")
        if cl is not None and (not cl.isdigit() or len(cl) > 12):
            raise Refusal("bad-report", "Content-Length is not a number")
        if cl is not None and int(cl) > protocol.MAX_BODY:
            raise Refusal("too-large")  # read no further
        body = await _read_body(request, protocol.MAX_BODY, fleet.body_timeout)
        device = request.headers.get("x-mpota-device")
        if not protocol.valid_device_id(device):
            raise Refusal("bad-report", "X-Mpota-Device is missing or not a device id")
        secret = await anyio.to_thread.run_sync(fleet.secret, device)
        if secret is None:
            raise Refusal("unknown-device")
        if not protocol.mac_ok(bytes.fromhex(secret), body, request.headers.get("x-mpota-signature")):
            raise Refusal("bad-signature")
        batch = protocol.parse_batch(body, device)
        ack, stored, dups = await anyio.to_thread.run_sync(fleet.store.ingest, batch, secret)
        fleet.counts.add("reports", stored)
        fleet.counts.add("duplicates", dups)
        fleet.counts.add("batches")
        return _json({"ack": ack})
    except Refusal as r:
        fleet.counts.add(f"refused:{r.reason}")
        body = r.body()
        if r.reason == "replay":
            body["ack"] = r.ack
            fleet.counts.add("duplicates", getattr(r, "duplicates", 0))
        headers = {"Connection": "close"} if r.reason in ("too-large", "slow-client") else None
        return _json(body, r.status, headers)
    except ClientDisconnect:
        fleet.counts.add("refused:disconnected")
        return Response(status_code=400)


# ---- admin API ------------------------------------------------------------------------------
def _admin(handler, *, cookie_ok=True):
    async def wrapped(request: Request) -> Response:
        fleet: Fleet = request.app.state.fleet
        if not fleet.authorized(request, cookie_ok=cookie_ok and request.method == "GET"):
            fleet.counts.add("refused:admin-unauthorized")
            return _json({"error": "unauthorized", "detail": "Authorization: Bearer <token> (mpota fleet serve "
                                                              "--token-file)"}, 401,
                         {"WWW-Authenticate": 'Bearer realm="mpota fleet"'})
        try:
            return await handler(request, fleet)
        except MpotaError as e:
            return _json({"error": "bad-request", "detail": str(e), "hint": e.hint}, 400)
    return wrapped


def _int_param(request, name, default, lo, hi):
    v = request.query_params.get(name)
    if v in (None, ""):
        return default
    if not v.isdigit() or not lo <= int(v) <= hi:
        raise MpotaError(f"{name}={v[:20]!r}: give a whole number from {lo} to {hi}")
    return int(v)


async def put_device(request: Request, fleet: Fleet) -> Response:
    device = request.path_params["id"]
    if not protocol.valid_device_id(device):
        raise MpotaError("a device id is 1-64 of A-Z a-z 0-9 . _ : -")
    try:
        doc = await request.json()
    except ValueError:
        raise MpotaError('the body is JSON: {"secret": "<64 hex>", "board": opt, "interval_s": opt, '
                         '"cohort": opt}') from None
    if not isinstance(doc, dict) or not isinstance(doc.get("secret"), str):
        raise MpotaError('the body needs "secret": 64 hex digits')
    extra = set(doc) - {"secret", "board", "interval_s", "cohort"}
    if extra:
        raise MpotaError(f"unknown field {sorted(extra)[0]!r}")
    try:
        secret = protocol.parse_secret(doc["secret"]).hex()
    except ValueError as e:
        raise MpotaError(str(e)) from None
    iv = doc.get("interval_s")
    if iv is not None and (not isinstance(iv, int) or isinstance(iv, bool) or not 1 <= iv <= 30 * 86400):
        raise MpotaError("interval_s is the device's check interval in seconds, 1 to 2592000")
    for k in ("board", "cohort"):
        v = doc.get(k)
        if v is not None and not (isinstance(v, str) and 1 <= len(v) <= protocol.MAX_TEXT and v.isprintable()):
            raise MpotaError(f"{k} is text of 1 to {protocol.MAX_TEXT} characters")
    created = await anyio.to_thread.run_sync(lambda: fleet.store.register(
        device, secret, board=doc.get("board"), interval_s=iv, cohort=doc.get("cohort")))
    return _json({"device": device, "created": created}, 201 if created else 200)


async def delete_device(request: Request, fleet: Fleet) -> Response:
    device = request.path_params["id"]
    forget = request.query_params.get("forget") in ("1", "true")
    done = await anyio.to_thread.run_sync(lambda: fleet.store.unregister(device, forget=forget))
    if not done:
        return _json({"error": "unknown-device"}, 404)
    return _json({"device": device, "deleted": True, "forgotten": forget})


async def get_devices(request: Request, fleet: Fleet) -> Response:
    q = request.query_params
    filters = {k: q.get(k) for k in views.FILTERS}
    limit = _int_param(request, "limit", 1000, 1, 100000)
    offset = _int_param(request, "offset", 0, 0, 10 ** 9)
    out = await anyio.to_thread.run_sync(lambda: views.list_devices(fleet.store, filters, limit=limit, offset=offset))
    return _json(out)


async def get_device(request: Request, fleet: Fleet) -> Response:
    limit = _int_param(request, "limit", 100, 1, 10000)
    out = await anyio.to_thread.run_sync(lambda: views.device_detail(fleet.store, request.path_params["id"],
                                                                     limit=limit))
    return _json(out) if out is not None else _json({"error": "unknown-device"}, 404)


async def get_events(request: Request, fleet: Fleet) -> Response:
    q = request.query_params
    limit = _int_param(request, "limit", 100, 1, 10000)
    before = _int_param(request, "before", None, 1, 2 ** 62)
    out = await anyio.to_thread.run_sync(lambda: views.list_events(
        fleet.store, device=q.get("device") or None, event=q.get("event") or None, before=before, limit=limit))
    return _json(out)


async def get_releases(request: Request, fleet: Fleet) -> Response:
    snap = await anyio.to_thread.run_sync(fleet.snapshot)
    return _json(snap.releases())


async def get_anomalies(request: Request, fleet: Fleet) -> Response:
    snap = await anyio.to_thread.run_sync(fleet.snapshot)
    return _json(snap.anomalies())


async def get_stats(request: Request, fleet: Fleet) -> Response:
    def work():
        fleet.counts.flush(fleet.store)
        return views.stats(fleet.store)
    return _json(await anyio.to_thread.run_sync(work))


# ---- rollouts (docs/rollout.md "Fleet server") --------------------------------------------------
ROLLOUT_FIELDS = {"release_dir", "id", "stages_bp", "min_devices", "max_failure_rate", "silent_after_s",
                  "valid_for_s", "targets", "window"}


async def _json_body(request: Request, what: str) -> dict:
    fleet: Fleet = request.app.state.fleet
    try:
        body = await _read_body(request, 64 * 1024, fleet.body_timeout)
        doc = json.loads(body or b"{}")
    except (Refusal, ValueError):
        raise MpotaError(f"the body is a JSON object: {what}") from None
    if not isinstance(doc, dict):
        raise MpotaError(f"the body is a JSON object: {what}")
    return doc


async def post_rollout(request: Request, fleet: Fleet) -> Response:
    what = ('{"release_dir": PATH on the server, "stages_bp": [100, 1000, ...], "min_devices": N, '
            '"max_failure_rate": R, "silent_after_s": T, opt. "valid_for_s", "targets", "window", "id"}')
    doc = await _json_body(request, what)
    extra = set(doc) - ROLLOUT_FIELDS
    if extra:
        raise MpotaError(f"unknown field {sorted(extra)[0]!r}", hint=what)
    if not isinstance(doc.get("release_dir"), str):
        raise MpotaError('"release_dir" is the release directory\'s path on the server', hint=what)
    cfg = {k: v for k, v in doc.items() if k not in ("release_dir", "id")}

    def work():
        row = rollouts.start(fleet.store, fleet.rollout_key, doc["release_dir"], cfg, rollout_id=doc.get("id"))
        log.warning("fleet: rollout %s of %s started (%s)", row["id"], row["version"], row["path"])
        return rollouts.status(fleet.store, row["id"])
    return _json(await anyio.to_thread.run_sync(work), 201)


async def get_rollouts(request: Request, fleet: Fleet) -> Response:
    return _json(await anyio.to_thread.run_sync(lambda: rollouts.list_rollouts(fleet.store)))


async def get_rollout(request: Request, fleet: Fleet) -> Response:
    out = await anyio.to_thread.run_sync(lambda: rollouts.status(fleet.store, request.path_params["id"]))
    return _json(out) if out is not None else _json({"error": "unknown-rollout"}, 404)


async def post_rollout_action(request: Request, fleet: Fleet) -> Response:
    rid, action = request.path_params["id"], request.path_params["action"]
    if action not in ("pause", "resume", "halt"):
        return _json({"error": "not-found"}, 404)
    doc = await _json_body(request, '{"reason": TEXT} (a halt needs one)')
    reason = doc.get("reason")
    if reason is not None and not (isinstance(reason, str) and len(reason) <= 400 and reason.isprintable()):
        raise MpotaError("reason is printable text of at most 400 characters")
    if await anyio.to_thread.run_sync(fleet.store.rollout, rid) is None:
        return _json({"error": "unknown-rollout"}, 404)

    def work():
        rollouts.act(fleet.store, fleet.rollout_key, rid, action, reason)
        log.warning("fleet: rollout %s: %s by hand%s", rid, action, f" ({reason})" if reason else "")
        return rollouts.status(fleet.store, rid)
    return _json(await anyio.to_thread.run_sync(work))


async def healthz(request: Request) -> Response:
    fleet: Fleet = request.app.state.fleet
    try:
        await anyio.to_thread.run_sync(fleet.store.counts)
    except Exception as e:  # the database is not answering: a load balancer takes us out
        return _json({"ok": False, "db": fleet.store.kind, "error": type(e).__name__}, 503)
    return _json({"ok": True, "db": fleet.store.kind})


# ---- dashboard ------------------------------------------------------------------------------
def _page(render):
    async def wrapped(request: Request) -> Response:
        fleet: Fleet = request.app.state.fleet
        token = request.query_params.get("token")
        if token is not None:  # ?token= once: a cookie from then on, and the token leaves the URL
            if hmac.compare_digest(token.encode(), fleet.token.encode()):
                resp = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
                _set_cookie(resp, fleet)
                return resp
            return dashboard.login(wrong=True, status=401)
        if not fleet.authorized(request, cookie_ok=True):
            return dashboard.login(wrong=False, status=401)
        return await anyio.to_thread.run_sync(lambda: render(request, fleet))
    return wrapped


def _set_cookie(resp: Response, fleet: Fleet):
    resp.set_cookie(COOKIE, fleet.cookie_value, httponly=True, samesite="strict", max_age=30 * 86400)


async def post_login(request: Request) -> Response:
    fleet: Fleet = request.app.state.fleet
    try:  # a urlencoded form of one field (no multipart parser needed for that)
        body = await _read_body(request, 4096, fleet.body_timeout)
    except Refusal:
        return dashboard.login(wrong=True, status=400)
    token = (parse_qs(body.decode("utf-8", errors="replace")).get("token") or [""])[0]
    if not hmac.compare_digest(token.encode(), fleet.token.encode()):
        fleet.counts.add("refused:admin-unauthorized")
        return dashboard.login(wrong=True, status=401)
    resp = RedirectResponse("/", status_code=303)
    _set_cookie(resp, fleet)
    return resp


def _overview(request, fleet):
    return dashboard.overview(fleet.snapshot(), fleet.store, release=request.query_params.get("release"))


def _release_page(request, fleet):
    return dashboard.release_page(fleet.snapshot(), request.path_params["version"])


def _rollouts_page(request, fleet):
    return dashboard.rollouts_page(rollouts.list_rollouts(fleet.store))


def _rollout_page(request, fleet):
    return dashboard.rollout_page(rollouts.status(fleet.store, request.path_params["id"]))


def _device_page(request, fleet):
    d = views.device_detail(fleet.store, request.path_params["id"])
    return dashboard.device_page(d)


async def _not_found(request, exc):
    if request.url.path.startswith("/v1/") or request.url.path == "/healthz":
        reason = "not-found" if exc.status_code == 404 else "bad-method"
        if request.url.path == "/v1/reports" and exc.status_code == 405:
            request.app.state.fleet.counts.add("refused:bad-method")
        return _json({"error": reason}, exc.status_code)
    return Response(f"{exc.status_code} {exc.detail}\n", status_code=exc.status_code, media_type="text/plain")


def create_app(store: Store, token: str, *, body_timeout: float = protocol.BODY_TIMEOUT_S, rollout_key=None,
               rollout_interval: float = ROLLOUT_INTERVAL_S) -> Starlette:
    """rollout_key: the rollout role's private key; with it the app evaluates the rollouts every
    rollout_interval seconds (one process among several: the lease in the database) and re-signs
    their documents."""
    fleet = Fleet(store, token, body_timeout, rollout_key)

    @asynccontextmanager
    async def lifespan(app):
        async def flusher():
            while True:
                await asyncio.sleep(COUNT_FLUSH_S)
                try:
                    await anyio.to_thread.run_sync(fleet.counts.flush, store)
                except Exception as e:
                    log.warning("fleet: could not save the counters: %s", e)
        async def roller():
            ttl = 3 * rollout_interval + 5  # a holder that died is replaced after this
            while True:
                await asyncio.sleep(rollout_interval)
                try:
                    done = await anyio.to_thread.run_sync(lambda: rollouts.tick(
                        store, fleet.rollout_key, holder=fleet.holder, ttl=ttl))
                except Exception as e:  # the database or the release directory is away: next round
                    log.warning("fleet: rollout evaluation failed: %s", e)
                    continue
                for e in done:
                    log.warning("fleet: rollout %s: %s%s%s", e["rollout"], e["action"],
                                f" (issued {e['issued']})" if e.get("issued") else "",
                                f": {e['reason']}" if e.get("reason") else "")
        tasks = [asyncio.create_task(flusher())]
        if fleet.rollout_key is not None:
            tasks.append(asyncio.create_task(roller()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            try:
                fleet.counts.flush(store)
            except Exception as e:
                log.warning("fleet: could not save the counters at shutdown: %s", e)

    routes = [
        Route("/v1/reports", post_reports, methods=["POST"]),
        Route("/v1/admin/devices", _admin(get_devices), methods=["GET"]),
        Route("/v1/admin/devices/{id}", _admin(get_device), methods=["GET"]),
        Route("/v1/admin/devices/{id}", _admin(put_device, cookie_ok=False), methods=["PUT"]),
        Route("/v1/admin/devices/{id}", _admin(delete_device, cookie_ok=False), methods=["DELETE"]),
        Route("/v1/admin/events", _admin(get_events), methods=["GET"]),
        Route("/v1/admin/releases", _admin(get_releases), methods=["GET"]),
        Route("/v1/admin/anomalies", _admin(get_anomalies), methods=["GET"]),
        Route("/v1/admin/stats", _admin(get_stats), methods=["GET"]),
        Route("/v1/admin/rollouts", _admin(get_rollouts), methods=["GET"]),
        Route("/v1/admin/rollouts", _admin(post_rollout, cookie_ok=False), methods=["POST"]),
        Route("/v1/admin/rollouts/{id}", _admin(get_rollout), methods=["GET"]),
        Route("/v1/admin/rollouts/{id}/{action}", _admin(post_rollout_action, cookie_ok=False), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/", _page(_overview), methods=["GET"]),
        Route("/login", post_login, methods=["POST"]),
        Route("/releases/{version}", _page(_release_page), methods=["GET"]),
        Route("/devices/{id}", _page(_device_page), methods=["GET"]),
        Route("/rollouts", _page(_rollouts_page), methods=["GET"]),
        Route("/rollouts/{id}", _page(_rollout_page), methods=["GET"]),
        Mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _not_found})
    app.state.fleet = fleet
    return app
