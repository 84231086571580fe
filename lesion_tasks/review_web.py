"""The review UI as a FastAPI app: queue, case, model versions, nights. No Airflow in here.

`plugins/lesion_review.py` mounts it in the Airflow API server and hands it Airflow's login (who the
caller is, whether they may record verdicts) and the project's settings (Connections first). Every
route needs a logged-in user: pages redirect to the login, everything else answers 401. Images and
overlays are streamed by the app from the private store (no public bucket, no link that outlives
the session); links inside the app are relative, so it works under any prefix and inside Airflow's
iframe.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from lesion_tasks import previews, review
from lesion_tasks.db import make_engine
from lesion_tasks.schema import images, model_versions, predictions
from lesion_tasks.settings import Settings
from lesion_tasks.store import ObjectNotFound, ObjectStore, StoreError, key_of, open_store

log = logging.getLogger(__name__)

THUMB_SIDE = 192  # queue thumbnails
LARGE_SIDE = 1024  # the case page's view of the original (ISIC originals reach 6000x4000)
CACHE = "private, max-age=300"
SECURITY_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                                               "frame-ancestors 'self'; form-action 'self'",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}


@dataclass(frozen=True)
class Reviewer:
    name: str
    can_view: bool  # may see cases
    can_review: bool  # may record verdicts


class NotLoggedIn(Exception):
    pass


async def _current_user(request: Request) -> Reviewer:
    """Every route's dependency: the logged-in reviewer (the app's `authenticate` says who)."""
    who = await request.app.state.authenticate(request)
    if who is None:
        raise NotLoggedIn()
    if not who.can_view:
        raise HTTPException(403, f"user {who.name!r} may not see lesion_nightly_score's predictions")
    return who


User = Annotated[Reviewer, Depends(_current_user)]


class Backend:
    """The database engine and store of the current settings, made once per app."""

    def __init__(self, settings: Callable[[], Settings]):
        self._settings = settings

    @cached_property
    def settings(self) -> Settings:
        return self._settings()

    @cached_property
    def engine(self) -> sa.Engine:
        return make_engine(self.settings.db_url)

    @cached_property
    def store(self) -> ObjectStore:
        return open_store(self.settings)


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")),
                      autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["f3"] = lambda v: "–" if v is None else f"{v:.3f}"
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    env.filters["when"] = lambda v: "–" if v is None else v.strftime("%Y-%m-%d %H:%M UTC")
    env.globals["flag_text"] = review.FLAG_TEXT
    env.globals["histogram_svg"] = histogram_svg
    env.globals["nights_svg"] = nights_svg
    return env


# --- charts (inline SVG: no JavaScript, no external files) ---------------------------------------

def histogram_svg(values: list[float], marks: dict[str, float], bins: int = 20, width: int = 420, height: int = 160) -> str:
    """Histogram of values in [0, 1] with labelled vertical marks (e.g. the threshold, the mean)."""
    counts = [0] * bins
    for v in values:
        counts[min(int(v * bins), bins - 1)] += 1
    top = max(counts) or 1
    pad, plot_h = 24, height - 40
    bar_w = (width - 2 * pad) / bins
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="MC distribution of p(MEL)">']
    for i, c in enumerate(counts):
        h = plot_h * c / top
        parts.append(f'<rect x="{pad + i * bar_w:.1f}" y="{10 + plot_h - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                     f'fill="#5b7db1"><title>{i / bins:.2f}–{(i + 1) / bins:.2f}: {c}</title></rect>')
    parts.append(f'<line x1="{pad}" y1="{10 + plot_h}" x2="{width - pad}" y2="{10 + plot_h}" stroke="#333"/>')
    for x in (0, 0.5, 1):
        parts.append(f'<text x="{pad + x * (width - 2 * pad):.1f}" y="{height - 12}" font-size="11" text-anchor="middle">{x:g}</text>')
    for k, (name, x) in enumerate(marks.items()):
        px = pad + min(max(x, 0), 1) * (width - 2 * pad)
        color = ("#c0392b", "#222", "#888")[k % 3]
        right = x > 0.6  # label on the left of marks near 1, so it stays inside the chart
        parts.append(f'<line x1="{px:.1f}" y1="8" x2="{px:.1f}" y2="{10 + plot_h}" stroke="{color}" stroke-dasharray="4 3"/>'
                     f'<text x="{px + (-3 if right else 3):.1f}" y="{18 + 12 * k}" font-size="11" fill="{color}" '
                     f'text-anchor="{"end" if right else "start"}">{name} {x:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _heat(frac: float) -> str:
    shade = int(255 - 200 * min(max(frac, 0.0), 1.0))
    return f"rgb({shade},{shade},255)"


def nights_svg(data: dict[str, Any], key: str, top: float, label: str, width: int = 520) -> str:
    """One row per night: the distribution of `key` as a heat strip (darker = more images)."""
    nights, bins = data["nights"], data["bins"]
    row_h, left, head = 18, 90, 22
    height = head + row_h * max(len(nights), 1) + 22
    cell = (width - left - 24) / bins
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{label} per night">',
             f'<text x="{left}" y="14" font-size="12">{label} (0 to {top:.2f}), share of the night\'s images</text>']
    for r, night in enumerate(nights):
        counts, total = night[key], max(sum(night[key]), 1)
        y = head + r * row_h
        parts.append(f'<text x="{left - 6}" y="{y + 13}" font-size="11" text-anchor="end">{night["night"]}</text>')
        for i, c in enumerate(counts):
            parts.append(f'<rect x="{left + i * cell:.1f}" y="{y}" width="{cell - 1:.1f}" height="{row_h - 2}" fill="{_heat(c / total)}">'
                         f'<title>{night["night"]}: {c} of {total} in [{i * top / bins:.2f}, {(i + 1) * top / bins:.2f})</title></rect>')
    y = head + row_h * max(len(nights), 1) + 14
    for x in (0, 0.5, 1):
        parts.append(f'<text x="{left + x * (width - left - 24):.1f}" y="{y}" font-size="11" text-anchor="middle">{x * top:.2f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def queue_bars_svg(data: dict[str, Any], width: int = 640) -> str:
    """Per night: images scored, cases flagged for review, verdicts recorded."""
    nights = data["nights"]
    row_h, left, head = 18, 90, 22
    height = head + row_h * max(len(nights), 1) + 8
    top = max([n["scored"] for n in nights] + [1])
    scale = (width - left - 230) / top
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="review queue size per night">',
             f'<text x="{left}" y="14" font-size="12">grey: scored · red: flagged for review · green: verdicts</text>']
    for r, n in enumerate(nights):
        y = head + r * row_h
        parts.append(f'<text x="{left - 6}" y="{y + 13}" font-size="11" text-anchor="end">{n["night"]}</text>'
                     f'<rect x="{left}" y="{y}" width="{n["scored"] * scale:.1f}" height="{row_h - 2}" fill="#ddd"/>'
                     f'<rect x="{left}" y="{y + 3}" width="{n["flagged"] * scale:.1f}" height="{row_h - 8}" fill="#c0392b"/>'
                     f'<rect x="{left}" y="{y + 6}" width="{n["reviewed"] * scale:.1f}" height="{row_h - 14}" fill="#27ae60"/>'
                     f'<text x="{left + n["scored"] * scale + 6:.1f}" y="{y + 13}" font-size="11">'
                     f'{n["flagged"]} flagged of {n["scored"]}, {n["reviewed"]} reviewed</text>')
    parts.append("</svg>")
    return "".join(parts)


# --- the app ------------------------------------------------------------------------------------

def _same_origin(request: Request) -> bool:
    """A browser form post must come from this site (the login cookie is SameSite=Lax as well)."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return "authorization" in request.headers  # API clients with a bearer token send no Origin
    return urlsplit(source).netloc == request.headers.get("host")


def create_app(settings: Callable[[], Settings], authenticate: Callable[[Request], Awaitable[Reviewer | None]],
               login_url: Callable[[str], str]) -> FastAPI:
    """The review app. `authenticate` (async) returns the logged-in reviewer or None; `login_url(next)`
    is where a browser without a login is sent."""
    app = FastAPI(title="Lesion review", docs_url=None, redoc_url=None, openapi_url=None)
    backend = Backend(settings)
    templates = _templates()

    app.state.authenticate = authenticate

    @app.exception_handler(NotLoggedIn)
    async def _not_logged_in(request: Request, _exc: NotLoggedIn) -> Response:
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(login_url(str(request.url)), status_code=302)
        return Response("Not authenticated: log in to Airflow first", status_code=401, media_type="text/plain")

    @app.exception_handler(LookupError)
    async def _not_found(_request: Request, exc: LookupError) -> Response:
        return Response(str(exc), status_code=404, media_type="text/plain")

    @app.exception_handler(StoreError)
    async def _store_down(_request: Request, exc: StoreError) -> Response:
        return Response(f"object store unavailable: {exc}", status_code=503, media_type="text/plain")

    @app.exception_handler(previews.Busy)
    async def _busy(_request: Request, exc: previews.Busy) -> Response:
        return Response(str(exc), status_code=503, media_type="text/plain", headers={"Retry-After": "5"})

    @app.exception_handler(previews.TooLargeToDecode)
    async def _too_large(_request: Request, exc: previews.TooLargeToDecode) -> Response:
        return Response(f"image too large to preview: {exc}", status_code=413, media_type="text/plain")

    @app.exception_handler(ValueError)
    async def _bad_request(_request: Request, exc: ValueError) -> Response:
        return Response(str(exc), status_code=400, media_type="text/plain")

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers["Server-Timing"] = f"app;dur={1000 * (time.perf_counter() - started):.1f}"
        return response

    def page(request: Request, name: str, who: Reviewer, **context: Any) -> HTMLResponse:
        # relative links only: the app may sit under any prefix (and inside Airflow's iframe)
        path, prefix = request.url.path, request.scope.get("root_path", "")
        inner = path[len(prefix):] if prefix and path.startswith(prefix) else path
        root = "../" * inner.count("/", 1) or "./"
        return HTMLResponse(templates.get_template(name).render(user=who, root=root, **context),
                            headers={"Cache-Control": "no-store"})

    @app.get("/", response_class=HTMLResponse)
    def queue_page(request: Request, who: User, version: str | None = None, drop: str | None = None, label: str | None = None,
                   flag: str | None = None, status: str = "open", sort: str = "entropy", offset: int = 0,
                   limit: int = 500):
        f = review.QueueFilter(version or None, drop or None, label or None, flag or None, status, sort, limit, offset)
        with backend.engine.connect() as conn:
            result = review.queue(conn, f)
            menus = review.choices(conn)
        params = {k: v for k, v in {"version": version, "drop": drop, "label": label, "flag": flag,
                                    "status": status, "sort": sort}.items() if v}
        more = offset + limit < result["total"]
        return page(request, "queue.html", who, q=result, f=f, menus=menus, flags=review.FLAGS, statuses=review.STATUSES,
                    sorts=list(review.SORTS), next_page=urlencode({**params, "offset": offset + limit, "limit": limit}) if more else None)

    @app.get("/case/{image_id}", response_class=HTMLResponse)
    def case_page(request: Request, who: User, image_id: str, version: str | None = None, saved: str | None = None):
        with backend.engine.connect() as conn:
            data = review.case(conn, image_id, version)
            upcoming = review.queue(conn, review.QueueFilter(data["prediction"]["model_version"], limit=2))["cases"]
        next_case = next((c["image_id"] for c in upcoming if c["image_id"] != image_id), None)
        samples = data["samples"] or []
        return page(request, "case.html", who, c=data, samples=samples, saved=saved, submission_id=uuid.uuid4().hex,
                    sample_sd=_sd(samples), labels=("MEL", "NV", "OTHER"), next_case=next_case)

    @app.post("/case/{image_id}/review")
    def review_case(request: Request, who: User, image_id: str, model_version: str = Form(...), verdict: str = Form(...),
                    submission_id: str = Form(...), label: str | None = Form(None), note: str | None = Form(None),
                    next_case: str | None = Form(None)):
        if not who.can_review:
            raise HTTPException(403, f"user {who.name!r} may look at cases but not record verdicts (needs edit access to lesion_retrain)")
        if not _same_origin(request):
            raise HTTPException(403, "cross-site form post refused")
        stored = review.record(backend.engine, image_id, model_version, verdict, who.name, label or None, note,
                               submission_id)
        log.info("review %s: %s on %s (%s) by %s", stored["id"], stored["verdict"], image_id, model_version, who.name)
        # the next open case (or this one again), one path segment under case/, on this site
        target = quote(next_case or image_id, safe="") + "?" + urlencode({"version": model_version, "saved": image_id})
        return RedirectResponse(f"../{target}", status_code=303)

    @app.get("/models", response_class=HTMLResponse)
    def models_page(request: Request, who: User):
        with backend.engine.connect() as conn:
            rows = review.model_overview(conn)
        return page(request, "models.html", who, models=rows)

    @app.get("/nights", response_class=HTMLResponse)
    def nights_page(request: Request, who: User, nights: int = 14):
        if not 1 <= nights <= 366:
            raise ValueError(f"nights={nights}: expected 1 to 366")
        with backend.engine.connect() as conn:
            data = review.nightly(conn, nights)
        return page(request, "nights.html", who, data=data, n=nights, bars=queue_bars_svg(data), ln2=math.log(2))

    def _read(uri: str | None, what: str) -> bytes:
        if uri is None:
            raise LookupError(f"{what}: not found")
        try:
            return backend.store.get(key_of(backend.store, uri))
        except ObjectNotFound:
            raise LookupError(f"{what}: the object {uri} is missing from the store") from None

    def _object(uri: str | None, side: int | None, media_type: str, what: str) -> Response:
        if not side:
            return Response(_read(uri, what), media_type=media_type, headers={"Cache-Control": CACHE})
        with previews.decode_slot():
            data = previews.downscaled(_read(uri, what), side)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": CACHE})

    def _large_view(row: Any, what: str) -> Response:
        """The original downscaled to LARGE_SIDE, or (past the decoding budget) the normalised copy."""
        if row.n_bytes <= previews.DECODE_MAX_BYTES:
            try:
                with previews.decode_slot():  # the original's bytes count against the slot too
                    data = previews.downscaled(_read(row.original_uri, what), LARGE_SIDE)
                return Response(data, media_type="image/jpeg", headers={"Cache-Control": CACHE, "X-Lesion-View": "original"})
            except previews.TooLargeToDecode as exc:
                log.debug("%s: the large view is the normalised copy (%s)", what, exc)
        return Response(_read(row.normalized_uri, what), media_type="image/jpeg",
                        headers={"Cache-Control": CACHE, "X-Lesion-View": "normalized"})

    @app.get("/image/{image_id}")
    def image(who: User, image_id: str, size: str = "normalized"):
        """size: normalized (the model's input copy), thumb, or large (the original, downscaled; the
        normalised copy when the original is past the decoding budget)."""
        if size not in ("normalized", "thumb", "large"):
            raise ValueError(f"size={size!r}: expected normalized, thumb or large")
        what = f"image {image_id!r}"
        with backend.engine.connect() as conn:
            row = conn.execute(sa.select(images.c.original_uri, images.c.normalized_uri, images.c.n_bytes)
                               .where(images.c.image_id == image_id)).first()
        if row is None:
            raise LookupError(f"{what}: not found")
        if size == "large":
            return _large_view(row, what)
        return _object(row.normalized_uri, THUMB_SIDE if size == "thumb" else None, "image/jpeg", what)

    @app.get("/overlay/{model_version}/{image_id}")
    def overlay(who: User, model_version: str, image_id: str, thumb: bool = False):
        what = f"Grad-CAM of {image_id!r} by {model_version!r}"
        with backend.engine.connect() as conn:
            found = conn.execute(sa.select(predictions.c.gradcam_uri).where(predictions.c.image_id == image_id)
                                 .where(predictions.c.model_version == model_version)).first()
        if found is not None and found.gradcam_uri is None:
            raise LookupError(f"{what}: removed by `lesion gc` (the artifacts of model version {model_version!r} were "
                              "pruned; its prediction is kept)")
        return _object(found.gradcam_uri if found else None, THUMB_SIDE if thumb else None, "image/png", what)

    @app.get("/models/{model_version}/report")
    def report(who: User, model_version: str):
        with backend.engine.connect() as conn:
            uri = conn.execute(sa.select(model_versions.c.report_uri)
                               .where(model_versions.c.model_version == model_version)).scalar()
        response = _object(uri, None, "text/html", f"report of {model_version!r}")
        response.headers["Content-Security-Policy"] = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'"
        return response

    return app


def _sd(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
