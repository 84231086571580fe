"""Human review of what the model was unsure about: the queue, the label check (ISIC labels the model
contradicts), one case (recording verdicts: verdicts.py; the Nights page's aggregates: trends.py).

The review UI (plugins/lesion_review.py) calls these; they know nothing of the web.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa

from lesion_tasks.core.schema import drops, images, model_versions, prediction_samples, predictions, reviews
from lesion_tasks.core.schema import splits as split_rows
from lesion_tasks.data.trainset import latest_reviews
from lesion_tasks.sites import operating
from lesion_tasks.sites.status import status_at
from lesion_tasks.versions import registry, succession

FLAGS = ("predicted_mel", "uncertain", "near_threshold", "out_of_scope", "attention_off_lesion", "site_failing")
# what the UI shows for each flag of `predictions.review_reasons`: a badge and what it means (tooltip)
FLAG_TEXT = {
    "predicted_mel": ("predicted_mel", "predicted melanoma: p(MEL) at or above the model version's threshold"),
    "uncertain": ("uncertain", "the decision could go either way: more of the MC-dropout samples of p(MEL) than the version's "
                               "rule allows (30%; a fifth for versions before 2026-12-06) fall on the other side of the "
                               "threshold (versions trained before that rule: entropy above theirs)"),
    "near_threshold": ("near_threshold", "p(MEL) close to the threshold applied at the case's site: within 0.15 on the logit "
                                         "scale (about ±16% in odds; versions before 2026-12-06: ±0.05 in probability)"),
    "out_of_scope": ("out of scope (not MEL/NV)",
                     "the model thinks this lesion is neither melanoma nor nevus (e.g. basal cell carcinoma): "
                     "outside the two classes it was trained to tell apart, so p(MEL) may mislead; p(other) is that probability"),
    "attention_off_lesion": ("attention off lesion",
                             "a melanoma call whose Grad-CAM mass lies mostly outside the lesion (skin, bubbles, dark "
                             "corners): the model may be deciding on something else than the lesion; check the overlay"),
    "site_failing": ("site failing", "the model version is below a gate floor at this case's site, on that site's own "
                                     "labelled images (lesion sites): every case from there is reviewed"),
    "disagrees_with_verdict": ("disagrees with verdict", "a reviewer's verdict, given under another model version, says "
                                                         "otherwise: open again for a second look"),
}
STATUSES = ("open", "reviewed", "all")
# images.label: a verdict becomes a training label only where ISIC gave none, so the queue shows unlabelled
# images by default; labelled ones are for reporting ISIC label errors (label_check)
LABELLED = ("unlabelled", "labelled", "all")
DEFAULT_LABELLED = "unlabelled"  # the review UI's default
SPLIT_FILTERS = ("train", "val", "test", "none")  # none: no row in `splits` (never trained on nor tested with)
LIKELY_MEL = 0.5  # calibrated p(MEL) at or above: more likely melanoma than not (the priority order's first tier)


def priority_order() -> tuple:
    """The default order, what needs action first (`v_review_queue.queue_rank` is the same in SQL, migration 0018):
    unlabelled images before ISIC-labelled ones (only there can a verdict become a training label); then likely
    melanomas (p_mel >= LIKELY_MEL) by p_mel; then the decisions the model is unsure of (flagged `uncertain`) by
    the share of MC samples across the threshold, ties nearest it; then the rest by p_mel. At a new site the
    threshold is set for sensitivity, so most cases are MEL calls: p_mel, not the call, tells them apart."""
    p = predictions.c
    likely, unsure = p.p_mel >= LIKELY_MEL, p.review_reasons.like("%uncertain%")  # no flag contains another
    return (sa.case((images.c.label.is_(None), 0), else_=1), sa.case((likely, 1), (unsure, 2), else_=3),
            sa.case((likely, p.p_mel), (unsure, sa.func.coalesce(p.decision_uncertainty, -1.0)), else_=p.p_mel).desc(),
            sa.func.abs(p.p_mel - p.threshold))


# each order's ORDER BY (image_id breaks the last ties) and what the queue page's control says it does.
# "decision": the share of MC samples across the case's threshold (NULL, rows scored before the column, last)
SORTS = {"priority": priority_order(), "decision": (sa.func.coalesce(predictions.c.decision_uncertainty, -1.0).desc(),
                                                    sa.func.abs(predictions.c.p_mel - predictions.c.threshold)),
         "entropy": (predictions.c.entropy.desc(), predictions.c.mutual_info.desc()),
         "mutual_info": (predictions.c.mutual_info.desc(), predictions.c.entropy.desc()),
         "p_mel": (predictions.c.p_mel.desc(), predictions.c.mutual_info.desc())}
SORT_TEXT = {"priority": f"likely melanomas first (p(MEL) ≥ {LIKELY_MEL}), then unsure decisions, then the rest",
             "decision": "most uncertain decision first", "entropy": "highest entropy first",
             "mutual_info": "highest mutual information first", "p_mel": "highest p(MEL) first"}
DEFAULT_SORT = "priority"
MAX_PAGE = 1000
MAX_OFFSET = 10**9  # far past any queue; larger values overflow the database's integers (a 500)
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class QueueFilter:
    """What the queue page shows. `model_version` None = the champion. `labelled` filters on the ISIC label
    (images.label; "all" here for callers of the library, the UI defaults to DEFAULT_LABELLED), `split`
    on the image's split (None: any)."""
    model_version: str | None = None
    drop_id: str | None = None
    label: str | None = None  # predicted label
    flag: str | None = None  # one of FLAGS
    status: str = "open"
    sort: str = DEFAULT_SORT
    limit: int = 500
    offset: int = 0
    labelled: str = "all"
    split: str | None = None
    site: str | None = None  # images.site, matched as stored

    def __post_init__(self):
        one_of("label", self.label, ("MEL", "NV"), optional=True)
        one_of("flag", self.flag, FLAGS, optional=True)
        one_of("status", self.status, STATUSES)
        one_of("sort", self.sort, tuple(SORTS))
        one_of("labelled", self.labelled, LABELLED)
        one_of("split", self.split, SPLIT_FILTERS, optional=True)
        if not 1 <= self.limit <= MAX_PAGE:
            raise ValueError(f"limit={self.limit}: expected 1 to {MAX_PAGE}")
        if not 0 <= self.offset <= MAX_OFFSET:
            raise ValueError(f"offset={self.offset}: expected 0 to {MAX_OFFSET}")
        if self.site is not None and not (isinstance(self.site, str) and 0 < len(self.site) <= 128
                                          and not CONTROL.search(self.site)):
            raise ValueError(f"site={str(self.site)[:140]!r}: expected a site's name as stored "
                             "(1-128 characters, no control characters)")


def one_of(name: str, value: Any, allowed: tuple, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(allowed)}")


def resolve_version(conn: sa.Connection, model_version: str | None) -> str | None:
    """The model version a page is about (None: no champion yet)."""
    v = registry.version(conn, model_version, required=False)
    return v.model_version if v else None


def contradicts_isic() -> sa.ColumnElement[bool]:
    """A prediction that contradicts the image's ISIC label: MEL predicted for an ISIC nevus, NV for an ISIC
    melanoma, or an ISIC OTHER lesion neither predicted MEL nor flagged out_of_scope (only where the model
    version has an out-of-scope head, i.e. p_other is set)."""
    label, predicted = images.c.label, predictions.c.predicted_label
    reasons = sa.func.coalesce(predictions.c.review_reasons, "")
    return sa.or_(sa.and_(label == "NV", predicted == "MEL"), sa.and_(label == "MEL", predicted == "NV"),
                  sa.and_(label == "OTHER", predictions.c.p_other.is_not(None), predicted == "NV",
                          sa.not_(reasons.contains("out_of_scope"))))


def not_fit_on(version: str) -> sa.ColumnElement[bool]:
    """The version was not fit on the image: it is outside the training split, or joined it after the version
    was trained. Disagreeing with a label it learnt from says little; disagreeing with one it never saw is news."""
    trained_at = sa.select(model_versions.c.created_at).where(model_versions.c.model_version == version).scalar_subquery()
    return sa.or_(split_rows.c.split.is_(None), split_rows.c.split != "train", split_rows.c.assigned_at > trained_at)


def contradiction_confidence() -> sa.ColumnElement[float]:
    """How sure the model is of its side of a contradiction: p(MEL) against an ISIC nevus, 1 - p(MEL) against
    an ISIC melanoma, 1 - p(other) against an ISIC OTHER lesion it neither called MEL nor flagged."""
    return sa.case((images.c.label == "NV", predictions.c.p_mel), (images.c.label == "MEL", 1 - predictions.c.p_mel),
                   else_=1 - sa.func.coalesce(predictions.c.p_other, 0.0))


def queue(conn: sa.Connection, f: QueueFilter) -> dict[str, Any]:
    """A page of the review queue (what `v_review_queue` holds for the champion, narrowed by `f`) in `f.sort`'s
    order (`priority_order` by default), with the latest verdict on each case; `total` counts the filtered queue
    and `counts` what each value of the labelled, split and status filters would show (the other filters kept)."""
    return _listing(conn, f, check=False)


def label_check(conn: sa.Connection, f: QueueFilter) -> dict[str, Any]:
    """ISIC-labelled images the model was not fit on (`not_fit_on`) whose prediction contradicts the ISIC
    label (`contradicts_isic`), flagged for review or not, the most confident contradiction first
    (`contradiction_confidence`): where the model disagrees with ISIC. `f.labelled` and `f.sort` are ignored."""
    return _listing(conn, replace(f, labelled="all"), check=True)


def _listing(conn: sa.Connection, f: QueueFilter, check: bool) -> dict[str, Any]:
    version = resolve_version(conn, f.model_version)
    if version is None:
        counts = _counts(f, [])
        return {"model_version": None, "total": counts.pop("total"), "cases": [], "counts": counts}
    latest = latest_reviews()  # a verdict is the reviewer's diagnosis of the image, whichever version was shown
    r = reviews.alias("r")
    mine = predictions.c.model_version == version
    # how far the version has scored the images: a queue still filling says so (and an empty page says why)
    scored = int(conn.scalar(sa.select(sa.func.count()).select_from(predictions).where(mine)) or 0)
    n_images = int(conn.scalar(sa.select(sa.func.count()).select_from(images)) or 0)
    shown = mine  # the version's predictions; the champion's queue also the previous champion's until it scored them
    previous = (succession.previous_champion(conn) if not check and scored < n_images
                and f.model_version in registry.CHAMPION_NAMES else None)
    if previous is not None:
        q = predictions.alias("q")
        shown = sa.or_(mine, sa.and_(predictions.c.model_version == previous, ~sa.exists().where(
            q.c.image_id == predictions.c.image_id, q.c.model_version == version)))  # a primary-key probe per row
    disagrees = disagrees_with_verdict(r)
    # images and splits joined on their primary key image_id; the version's rows via ix_predictions_version_review
    query = (sa.select(predictions.c.image_id, predictions.c.model_version, predictions.c.p_mel,
                       predictions.c.predicted_label, predictions.c.threshold, predictions.c.entropy,
                       predictions.c.mutual_info, predictions.c.decision_uncertainty, predictions.c.review_reasons,
                       predictions.c.drop_id,
                       predictions.c.scored_at, images.c.label.label("known_label"),
                       r.c.verdict.label("review_verdict"), r.c.label.label("review_label"), r.c.reviewer,
                       r.c.reviewed_at, r.c.model_version.label("review_model_version"), predictions.c.p_other,
                       predictions.c.gradcam_uri, split_rows.c.split, images.c.site,
                       sa.case((mine, "champion" if previous is not None else "version"),
                               else_="previous_champion").label("prediction_of"), disagrees.label("disagrees"))
             .join(images, images.c.image_id == predictions.c.image_id)
             .outerjoin(split_rows, split_rows.c.image_id == predictions.c.image_id)
             .outerjoin(latest, latest.c.image_id == predictions.c.image_id)
             .outerjoin(r, r.c.id == latest.c.review_id)
             .where(shown)
             .where(sa.and_(contradicts_isic(), not_fit_on(version)) if check
                    else sa.and_(sa.or_(predictions.c.needs_review,  # (an indexable superset first: few images
                                        predictions.c.image_id.in_(sa.select(reviews.c.image_id))),  # have verdicts)
                                 sa.or_(predictions.c.needs_review, disagrees))))
    if f.drop_id:
        query = query.where(predictions.c.drop_id == f.drop_id)
    if f.site:
        query = query.where(images.c.site == f.site)
    if f.label:
        query = query.where(predictions.c.predicted_label == f.label)
    if f.flag:
        # reasons are a comma-separated list of FLAGS (no flag is a substring of another)
        query = query.where(predictions.c.review_reasons.contains(f.flag))
    # one grouped scan instead of a count: the total and what each labelled / split / status value holds
    # open: no verdict yet, or one given under another version that this prediction disagrees with (no bound
    # parameters: PostgreSQL must see the GROUP BY and SELECT expressions equal)
    is_open = sa.or_(r.c.id.is_(None), disagrees)
    groups = conn.execute(query.with_only_columns(images.c.label, split_rows.c.split, is_open, sa.func.count())
                          .group_by(images.c.label, split_rows.c.split, is_open)).all()
    counts = _counts(f, groups)
    if f.labelled != "all":
        query = query.where(images.c.label.is_(None) if f.labelled == "unlabelled" else images.c.label.is_not(None))
    if f.split:
        query = query.where(split_rows.c.split.is_(None) if f.split == "none" else split_rows.c.split == f.split)
    if f.status == "open":
        query = query.where(is_open)
    elif f.status == "reviewed":
        query = query.where(sa.not_(is_open))
    order = (contradiction_confidence().desc(),) if check else SORTS[f.sort]
    rows = conn.execute(query.order_by(*order, predictions.c.image_id).limit(f.limit).offset(f.offset)).mappings().all()
    status = status_at(conn, version, {row["site"] for row in rows})
    out = {"model_version": version, "total": counts.pop("total"), "counts": counts, "previous_champion": previous,
           "cases": [_shown_case(row, status[row["site"]]) for row in rows], "scored": scored, "images": n_images}
    return out


def disagrees_with_verdict(r: Any) -> sa.ColumnElement[bool]:
    """The prediction contradicts the image's latest verdict (`r`), given under another model version: a melanoma or
    nevus verdict called the other class, or an OTHER verdict called NV without an out_of_scope flag. Such a case is
    open again, flagged `disagrees_with_verdict`. Literals inline: PostgreSQL compares GROUP BY and SELECT texts."""
    called, reasons = predictions.c.predicted_label, sa.func.coalesce(predictions.c.review_reasons, sa.literal_column("''"))
    mel, nv, other = (sa.literal_column(f"'{x}'") for x in ("MEL", "NV", "OTHER"))
    return sa.and_(r.c.id.is_not(None), r.c.model_version != predictions.c.model_version,
                   sa.or_(sa.and_(r.c.label.in_([mel, nv]), r.c.label != called),
                          sa.and_(r.c.label == other, called == nv,
                                  sa.not_(reasons.like(sa.literal_column("'%out_of_scope%'"))))))


def _shown_case(row: Any, site_status: str) -> dict[str, Any]:
    case = dict(row) | {"site_status": site_status}
    if case.pop("disagrees"):  # a review reason of its own, shown as a flag, decided as the queue is read
        case["review_reasons"] = ",".join(filter(None, (case["review_reasons"], "disagrees_with_verdict")))
    return case


def _counts(f: QueueFilter, groups) -> dict[str, Any]:
    """Per filter dimension, how many cases each value holds with every other filter kept ("all" included);
    `isic_label` per ISIC label under every filter; `total` under every filter."""
    dims = {"labelled": (f.labelled, LABELLED), "split": (f.split or "all", SPLIT_FILTERS + ("all",)),
            "status": (f.status, STATUSES)}
    counts: dict[str, Any] = {dim: dict.fromkeys(values, 0) for dim, (_, values) in dims.items()}
    counts["isic_label"], counts["total"] = dict.fromkeys(("MEL", "NV", "OTHER"), 0), 0
    for label, split, is_open, n in groups:
        value = {"labelled": "unlabelled" if label is None else "labelled", "split": split or "none",
                 "status": "open" if is_open else "reviewed"}
        chosen = {dim: sel in ("all", value[dim]) for dim, (sel, _) in dims.items()}
        for dim in dims:
            if all(ok for other, ok in chosen.items() if other != dim):
                counts[dim][value[dim]] += n
                counts[dim]["all"] += n
        if all(chosen.values()):
            counts["total"] += n
            if label is not None:
                counts["isic_label"][label] = counts["isic_label"].get(label, 0) + n
    return counts


def choices(conn: sa.Connection) -> dict[str, list[str]]:
    """Values for the queue's filter menus (the sites: every drop's, an image's site being its drop's)."""
    versions = registry.evaluated_ids(conn)
    scored = conn.scalars(sa.select(predictions.c.drop_id).distinct().order_by(predictions.c.drop_id)).all()
    sites = conn.scalars(sa.select(drops.c.site).where(drops.c.site.is_not(None)).distinct().order_by(drops.c.site)).all()
    return {"model_versions": list(versions), "drops": list(scored), "sites": list(sites)}


def case(conn: sa.Connection, image_id: str, model_version: str | None = None) -> dict[str, Any]:
    """Everything the case page shows: the prediction, its MC samples, the image, every verdict and
    the other model versions' predictions of the same image."""
    image = conn.execute(sa.select(images).where(images.c.image_id == image_id)).mappings().first()
    if image is None:
        raise LookupError(f"image {image_id!r} not found")
    version = resolve_version(conn, model_version)
    prediction, prediction_of = _prediction(conn, image_id, version), "version"
    if prediction is None and version is not None and model_version in registry.CHAMPION_NAMES:
        previous = succession.previous_champion(conn)  # the champion has not scored it yet: the queue's fallback
        if (fallback := _prediction(conn, image_id, previous)) is not None:
            version, prediction, prediction_of = previous, fallback, "previous_champion"
    if prediction is None:
        raise LookupError(f"image {image_id!r} has no prediction from model {version or '(no champion yet)'}")
    samples = conn.execute(sa.select(prediction_samples.c.p_mel_samples)
                           .where(prediction_samples.c.image_id == image_id)
                           .where(prediction_samples.c.model_version == version)).scalar()
    history = conn.execute(sa.select(reviews).where(reviews.c.image_id == image_id)
                           .order_by(reviews.c.id.desc())).mappings().all()
    others = conn.execute(sa.select(predictions.c.model_version, predictions.c.p_mel, predictions.c.p_other,
                                    predictions.c.predicted_label, predictions.c.entropy, predictions.c.mutual_info, predictions.c.needs_review,
                                    predictions.c.scored_at)
                          .where(predictions.c.image_id == image_id).where(predictions.c.model_version != version)
                          .order_by(predictions.c.scored_at.desc())).mappings().all()
    model = registry.version(conn, version)
    site = image["site"]
    return {"image": dict(image), "prediction": dict(prediction), "samples": samples, "reviews": [dict(h) for h in history],
            "other_predictions": [dict(o) for o in others], "prediction_of": prediction_of,
            "site": {"name": site, "status": status_at(conn, version, {site})[site],
                     "threshold": _threshold_words(conn, model, site, prediction["threshold"])},
            "model": {"model_version": model.model_version, "is_champion": model.is_champion, "status": model.status,
                      "backbone": model.backbone, "profile": model.profile,
                      "artifacts_pruned_at": model.artifacts_pruned_at}}


def _prediction(conn: sa.Connection, image_id: str, version: str | None) -> Any:
    return None if version is None else conn.execute(sa.select(predictions).where(
        predictions.c.image_id == image_id, predictions.c.model_version == version)).mappings().first()


def _threshold_words(conn: sa.Connection, model: registry.ModelVersion, site: str, applied: float) -> str:
    """How the threshold this case was decided at was chosen, in words (its site's operating point)."""
    point = operating.recorded(conn, model.model_version).get(site)
    method = point.method if point is not None and abs(point.threshold - applied) < 1e-12 else None
    if method == "unlabelled":
        return f"its operating point, estimated from {point.images} unlabelled images of its own"
    if method == "labelled" and point.labels:
        return (f"its own operating point: its {point.labelled} labelled images correct the calibration of its "
                f"{point.images} scored images")
    if method == "labelled" or model.own_threshold(site):
        return "its own threshold, chosen on its labels"
    return "the pooled threshold"


def model_overview(conn: sa.Connection) -> list[dict[str, Any]]:
    """Every model version, newest first: status, champion, threshold, gate decision, test metrics."""
    counts = dict(conn.execute(sa.select(predictions.c.model_version, sa.func.count())
                               .group_by(predictions.c.model_version)).all())
    out = []
    for v in registry.versions(conn):
        test = (v.metrics or {}).get("test", {})
        out.append({"model_version": v.model_version, "created_at": v.created_at, "status": v.status,
                    "is_champion": v.is_champion, "profile": v.profile, "backbone": v.backbone,
                    "threshold": v.threshold, "weights_source": v.weights_source,
                    "test": {k: test.get(k) for k in ("auc", "mel_sensitivity", "mel_specificity", "balanced_accuracy", "n", "n_mel")},
                    "ci95": test.get("ci95", {}), "gate": v.gate or {}, "report_uri": v.report_uri,
                    "reviewed_labels": v.lineage.get("reviewed_labels"),
                    "predictions": counts.get(v.model_version, 0), "artifacts_pruned_at": v.artifacts_pruned_at})
    return out
