"""The review UI as a FastAPI app: queue, label check, case, model versions, nights. No Airflow in here.

`plugins/lesion_review.py` mounts it in the Airflow API server and hands it Airflow's login (who the
caller is, whether they may record verdicts) and the project's settings (Connections first). Every
route needs a logged-in user: pages redirect to the login, everything else answers 401. Images and
overlays are streamed by the app from the private store (no public bucket, no link that outlives
the session; media.py, decoding within previews.py's bounds); links inside the app are relative, so
it works under any prefix and inside Airflow's iframe.
"""

from __future__ import annotations

import logging
import math
import re
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

from lesion_tasks.core.db import make_engine
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import ObjectStore, StoreError, open_store
from lesion_tasks.review import cases, hints, media, previews, trends, verdicts
from lesion_tasks.review.charts import histogram_svg, nights_svg, queue_bars_svg
from lesion_tasks.sites import status as sites
from lesion_tasks.sites.status import STATUS_TEXT as SITE_STATUS_TEXT
from lesion_tasks.versions import registry

log = logging.getLogger(__name__)

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


# Unicode bidirectional controls (U+202E and kin) reorder what follows them on screen: a note, a name or a
# metadata value could make text read other than it is. Stored verbatim; shown as visible codes.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _visible(value: Any) -> Any:
    """Every value a template prints (jinja's finalize): bidi controls become visible `[U+202E]`."""
    if isinstance(value, str) and _BIDI.search(value):
        return type(value)(_BIDI.sub(lambda m: f"[U+{ord(m.group()):04X}]", value))  # Markup stays Markup
    return value


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")), finalize=_visible,
                      autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["f3"] = lambda v: "–" if v is None else f"{v:.3f}"
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    env.filters["when"] = lambda v: "–" if v is None else v.strftime("%Y-%m-%d %H:%M UTC")
    env.filters["ci"] = _ci
    env.globals["flag_text"] = cases.FLAG_TEXT
    env.globals["site_status_text"] = SITE_STATUS_TEXT
    env.globals["histogram_svg"] = histogram_svg
    env.globals["nights_svg"] = nights_svg
    return env


# --- the app ------------------------------------------------------------------------------------

def _same_origin(request: Request) -> bool:
    """A browser form post must come from this site (the login cookie is SameSite=Lax as well). Only a
    bearer token exempts a post without an Origin: a browser sends no such header on its own (a
    script's cross-site one needs CORS), whereas it does resend Basic credentials of a proxy in front."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return request.headers.get("authorization", "")[:7].lower() == "bearer "  # API clients send no Origin
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

    @app.exception_handler(previews.TooMany)
    async def _too_many(_request: Request, exc: previews.TooMany) -> Response:
        return Response(str(exc), status_code=429, media_type="text/plain", headers={"Retry-After": "5"})

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

    def listing(request: Request, who: User, check: bool, version: str | None, drop: str | None, label: str | None,
                flag: str | None, status: str, sort: str, offset: int, limit: int, labelled: str, split: str | None,
                site: str | None):
        f = cases.QueueFilter(version or None, drop or None, label or None, flag or None, status, sort, limit, offset,
                               labelled or cases.DEFAULT_LABELLED, split or None, site or None)
        with backend.engine.connect() as conn:
            result = (cases.label_check if check else cases.queue)(conn, f)
            menus = cases.choices(conn)
            missing = hints.no_champion(conn) if result["model_version"] is None else None
        params = {k: v for k, v in {"version": version, "drop": drop, "label": label, "flag": flag, "status": status,
                                    "sort": sort, "labelled": None if check else f.labelled, "split": split,
                                    "site": site}.items() if v}
        empty = hints.empty_hints(f, result, check) if missing is None and result["total"] == 0 else None
        for hint in (empty or {}).get("hints", []):
            for link in hint["links"]:
                link["href"] = _href(link["path"], params, link["params"])
        more = offset + limit < result["total"]
        return page(request, "queue.html", who, q=result, f=f, check=check, menus=menus, flags=cases.FLAGS,
                    statuses=cases.STATUSES, sorts=cases.SORT_TEXT, labelled_values=cases.LABELLED,
                    split_values=cases.SPLIT_FILTERS, no_champion=missing, empty=empty,
                    next_page=_href("label-check" if check else "", params, {"offset": offset + limit, "limit": limit}) if more else None)

    @app.get("/", response_class=HTMLResponse)
    def queue_page(request: Request, who: User, version: str | None = None, drop: str | None = None, label: str | None = None,
                   flag: str | None = None, status: str = "open", sort: str = cases.DEFAULT_SORT, offset: int = 0,
                   limit: int = 500, labelled: str = cases.DEFAULT_LABELLED, split: str | None = None,
                   site: str | None = None):
        """The flagged predictions of a model version; by default those of unlabelled images (a verdict can
        become their training label), in the priority order (`cases.priority_order`)."""
        return listing(request, who, False, version, drop, label, flag, status, sort, offset, limit, labelled, split, site)

    @app.get("/label-check", response_class=HTMLResponse)
    def label_check_page(request: Request, who: User, version: str | None = None, drop: str | None = None,
                         label: str | None = None, flag: str | None = None, status: str = "open",
                         sort: str = cases.DEFAULT_SORT, offset: int = 0, limit: int = 500, split: str | None = None,
                         site: str | None = None):
        """ISIC-labelled images the model contradicts: candidates for an ISIC label error report."""
        return listing(request, who, True, version, drop, label, flag, status, sort, offset, limit, "all", split, site)

    @app.get("/case/{image_id}", response_class=HTMLResponse)
    def case_page(request: Request, who: User, image_id: str, version: str | None = None, saved: str | None = None,
                  check: bool = False):
        """`check`: opened from the label check, whose next open case the verdict form moves on to."""
        with backend.engine.connect() as conn:
            data = cases.case(conn, image_id, version)
            upcoming = cases.QueueFilter(data["prediction"]["model_version"], limit=2, labelled=cases.DEFAULT_LABELLED)
            upcoming = (cases.label_check if check else cases.queue)(conn, upcoming)["cases"]
        next_case = next((c["image_id"] for c in upcoming if c["image_id"] != image_id), None)
        samples = data["samples"] or []
        return page(request, "case.html", who, c=data, samples=samples, saved=saved, submission_id=uuid.uuid4().hex,
                    sample_sd=_sd(samples), spread=spread_words(_sd(samples)), labels=("MEL", "NV", "OTHER"), next_case=next_case, check=check,
                    verdicts_validate=backend.settings.verdicts_validate)

    @app.post("/case/{image_id}/review")
    def review_case(request: Request, who: User, image_id: str, model_version: str = Form(...), verdict: str = Form(...),
                    submission_id: str = Form(...), label: str | None = Form(None), note: str | None = Form(None),
                    next_case: str | None = Form(None), check: bool = Form(False)):
        if not who.can_review:
            raise HTTPException(403, f"user {who.name!r} may look at cases but not record verdicts (needs edit access to lesion_retrain)")
        if not _same_origin(request):
            raise HTTPException(403, "cross-site form post refused")
        stored = verdicts.record(backend.engine, image_id, model_version, verdict, who.name, label or None, note,
                               submission_id)
        log.info("review %s: %s on %s (%s) by %s", stored["id"], stored["verdict"], image_id, model_version, who.name)
        # the next open case (or this one again), one path segment under case/, on this site
        back = {"version": model_version, "saved": image_id, **({"check": "1"} if check else {})}
        target = quote(next_case or image_id, safe="") + "?" + urlencode(back)
        return RedirectResponse(f"../{target}", status_code=303)

    @app.get("/models", response_class=HTMLResponse)
    def models_page(request: Request, who: User):
        with backend.engine.connect() as conn:
            rows = cases.model_overview(conn)
        return page(request, "models.html", who, models=rows)

    @app.get("/sites", response_class=HTMLResponse)
    def sites_page(request: Request, who: User):
        """Every site: its status for the champion, labelled images per split, figures with CIs, its threshold,
        and what it still needs (`lesion sites`)."""
        with backend.engine.connect() as conn:
            data = sites.overview_of(conn)
        return page(request, "sites.html", who, data=data)

    @app.get("/sites/{site}", response_class=HTMLResponse)
    def site_page(request: Request, who: User, site: str):
        """A site's validation queue: its validation sample in drawn order, with progress."""
        with backend.engine.connect() as conn:
            data = sites.validation_queue(conn, site)
            status = sites.status_at(conn, data["champion"], {site})[site] if data["champion"] else "unvalidated"
        return page(request, "site.html", who, q=data, status=status)

    @app.get("/nights", response_class=HTMLResponse)
    def nights_page(request: Request, who: User, nights: int = 14):
        if not 1 <= nights <= 366:
            raise ValueError(f"nights={nights}: expected 1 to 366")
        with backend.engine.connect() as conn:
            champion = cases.resolve_version(conn, None)
            data = trends.nightly(conn, nights, model_version=champion)  # one version a night: the champion's
            missing = hints.no_champion(conn) if champion is None else None
        return page(request, "nights.html", who, data=data, n=nights, bars=queue_bars_svg(data), ln2=math.log(2),
                    champion=champion, no_champion=missing)

    @app.get("/models/{model_version}/report")
    def report(who: User, model_version: str):
        with backend.engine.connect() as conn:
            try:
                uri = registry.version(conn, model_version).report_uri
            except ValueError:  # not in the registry: not found, like a report not written yet
                uri = None
        response = media.stored(backend, uri, "text/html", f"report of {model_version!r}")
        response.headers["Content-Security-Policy"] = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'"
        return response

    app.include_router(media.router(backend, _current_user))  # /image/..., /overlay/...
    return app


def _href(path: str, params: dict[str, Any], changes: dict[str, Any]) -> str:
    """A link relative to the app's root: `path` with the page's parameters, `changes` applied (None drops one)."""
    merged = {k: v for k, v in {**params, **changes}.items() if v is not None}
    return f"{path}?{urlencode(merged)}" if merged else path or "./"


def _ci(pair: Any, pct: bool = False) -> str:
    """A 95% interval as "(lo–hi)"; "—" where the registry row has none (older versions, undefined bounds)."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or None in pair:
        return "—"
    return f"({100 * pair[0]:.1f}–{100 * pair[1]:.1f}%)" if pct else f"({pair[0]:.3f}–{pair[1]:.3f})"


# how the case page words the spread of the dropout samples of p(MEL) (their standard deviation)
SPREAD_WORDS = ((0.05, "narrow: the dropout samples agree"), (0.15, "moderate: the samples differ somewhat"),
                (float("inf"), "wide: the model disagrees with itself"))


def spread_words(sd: float | None) -> str:
    """`SPREAD_WORDS` for a standard deviation (the caption must follow the value)."""
    return "" if sd is None else next(words for bound, words in SPREAD_WORDS if sd < bound)


def _sd(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
