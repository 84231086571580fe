"""What a night says about its sites: the version's status at each site its images came from, how much of the
night rests on sites it was never validated at, and which sites it fails at (their cases all go to review).
`scoring.nightly` asks `failing_sites` before it scores and `site_statuses` / `night_sites` after."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from lesion_tasks.core.schema import SITE_STATUSES, images, predictions, site_evaluations
from lesion_tasks.sites.status import status_at, status_of
from lesion_tasks.versions import registry


def failing_sites(conn: sa.Connection, model_version: str) -> frozenset[str]:
    """Sites where `model_version`'s own evidence puts it below a floor (`site_evaluations`)."""
    return frozenset(conn.scalars(sa.select(site_evaluations.c.site).where(
        site_evaluations.c.model_version == model_version, site_evaluations.c.status == "failing")))


# the review reasons an NV call can carry (a MEL call is flagged for being one): what the night summary counts
NV_CALL_REASONS = ("uncertain", "near_threshold", "out_of_scope", "site_failing")
# a night whose predictions come more than this share from unvalidated sites says so (summary and alert)
UNVALIDATED_SHARE = 0.5


def site_statuses(conn: sa.Connection, model_version: str, run_id: str) -> dict[str, dict[str, Any]]:
    """{site: {"status", "images", "out_of_scope", "out_of_scope_share", "review"}} over this run's predictions of
    `model_version`: the version's status at each site by the rule of `v_sites` (`sites.status.status_at`), and
    how many of the site's images tonight were flagged out of scope (at a clinic of melanomas and nevi, each of
    them is review work spent on an in-scope lesion)."""
    def count(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
        return sa.func.sum(sa.case((condition, 1), else_=0))

    reasons = predictions.c.review_reasons
    nv_call = predictions.c.predicted_label == "NV"
    per_reason = [count(nv_call & reasons.like(f"%{r}%")) for r in NV_CALL_REASONS]
    rows = conn.execute(sa.select(images.c.site, sa.func.count(), count(reasons.like("%out_of_scope%")),
                                  count(predictions.c.predicted_label == "MEL"), count(nv_call & predictions.c.needs_review),
                                  *per_reason)
                        .join(images, images.c.image_id == predictions.c.image_id)
                        .where(predictions.c.run_id == run_id, predictions.c.model_version == model_version)
                        .group_by(images.c.site)).all()
    status = status_at(conn, model_version, {row[0] for row in rows})
    out = {}
    for name, n, oos, mel, nv_flagged, *by_reason in rows:
        out[name] = {"status": status[name], "images": int(n), "out_of_scope": int(oos or 0),
                     "out_of_scope_share": round(int(oos or 0) / n, 4),
                     # review work beyond the MEL calls: the NV calls flagged, and by which reason
                     "review": {"mel_calls_share": round(int(mel or 0) / n, 4),
                                "nv_calls_flagged_share": round(int(nv_flagged or 0) / n, 4),
                                "nv_calls_by_reason_share": {r: round(int(c or 0) / n, 4)
                                                             for r, c in zip(NV_CALL_REASONS, by_reason)}}}
    failing = [name for name, part in out.items() if part["status"] == "failing"]
    if failing:  # what its evidence says, in words (the floors it is below, with the intervals)
        floors = registry.version(conn, model_version).floors
        evidence = dict(conn.execute(sa.select(site_evaluations.c.site, site_evaluations.c.metrics).where(
            site_evaluations.c.model_version == model_version, site_evaluations.c.site.in_(failing))).all())
        for name in failing:
            out[name]["why"] = status_of(evidence.get(name), 1, floors)[1]
    return out


def night_sites(by_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How much of a night rests on evidence from its own sites: images per status, and a note when most
    come from sites the model was never validated at (decided at operating points from their unlabelled images)."""
    total = sum(part["images"] for part in by_site.values())
    by_status = {s: sum(p["images"] for p in by_site.values() if p["status"] == s) for s in SITE_STATUSES}
    unvalidated = sorted(name for name, part in by_site.items() if part["status"] == "unvalidated")
    share = by_status["unvalidated"] / total if total else 0.0
    out = {"images_by_status": by_status, "unvalidated_share": round(share, 4), "unvalidated_sites": unvalidated,
           "failing_sites": sorted(name for name, part in by_site.items() if part["status"] == "failing"),
           "mostly_unvalidated": share > UNVALIDATED_SHARE,
           "out_of_scope_share_by_site": {name: part["out_of_scope_share"] for name, part in sorted(by_site.items())
                                          if "out_of_scope_share" in part},
           "review_by_site": {name: part["review"] for name, part in sorted(by_site.items()) if "review" in part}}
    if out["mostly_unvalidated"]:
        out["note"] = (f"{by_status['unvalidated']} of {total} images tonight ({100 * share:.0f}%) come from sites the model "
                       f"was never validated at ({', '.join(unvalidated[:10])}{' ...' if len(unvalidated) > 10 else ''}): "
                       "they are decided at operating points estimated from their own unlabelled images, and no label "
                       "from those sites vouches for them. Draw each one's "
                       "validation sample (lesion sites sample SITE), import its labels and retrain.")
    if out["failing_sites"]:
        out["failing"] = {name: {"images": by_site[name]["images"], "why": by_site[name].get("why", "")}
                          for name in out["failing_sites"]}
    return out
