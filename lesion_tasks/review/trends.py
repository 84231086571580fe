"""What the Nights page shows: per scoring night, the champion's predictions scored and flagged, and histograms
of p_mel and entropy (drift at a glance), one model version a night, aggregated in SQL."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from lesion_tasks.core.schema import predictions, reviews


def _bin(column, bins: int, top: float, dialect: str):
    scaled = sa.func.least(column / top, 0.999999) if dialect == "postgresql" else sa.func.min(column / top, 0.999999)
    if dialect == "postgresql":
        return sa.cast(sa.func.floor(scaled * bins), sa.Integer)
    return sa.cast(scaled * bins, sa.Integer)  # SQLite's CAST truncates (values are >= 0)


def nightly(conn: sa.Connection, nights: int = 14, bins: int = 10, model_version: str | None = None) -> dict[str, Any]:
    """Per scoring night (UTC date) of the last `nights`: images scored, cases flagged for review, and
    histograms of p_mel (over [0, 1]) and entropy (over [0, ln 2]); all aggregated in SQL. With `model_version`
    (the page passes the champion) only its predictions count, one version a night, and `other_versions` says
    what earlier versions scored on the same nights ({version: predictions}): not added in."""
    dialect = conn.dialect.name
    since = datetime.now(UTC) - timedelta(days=nights)
    night = sa.func.date(predictions.c.scored_at).label("night")
    p_bin = _bin(predictions.c.p_mel, bins, 1.0, dialect).label("p_bin")
    e_bin = _bin(predictions.c.entropy, bins, math.log(2), dialect).label("e_bin")
    ours = predictions.c.model_version == model_version if model_version else sa.true()
    # one scan: at most nights x bins x bins groups, folded into the three views below
    groups = conn.execute(sa.select(night, p_bin, e_bin, sa.func.count(),
                                    sa.func.sum(sa.cast(predictions.c.needs_review, sa.Integer)))
                          .where(predictions.c.scored_at >= since, ours).group_by(night, p_bin, e_bin)).all()
    out: dict[str, dict[str, Any]] = {}
    for n, pb, eb, count, flagged in sorted(groups, key=lambda g: str(g[0])):
        row = out.setdefault(str(n), {"night": str(n), "scored": 0, "flagged": 0, "p_mel": [0] * bins,
                                      "entropy": [0] * bins, "other_versions": {}})
        row["scored"] += int(count)
        row["flagged"] += int(flagged or 0)
        row["p_mel"][min(max(int(pb), 0), bins - 1)] += int(count)
        row["entropy"][min(max(int(eb), 0), bins - 1)] += int(count)
    if model_version:
        for n, version, count in conn.execute(sa.select(night, predictions.c.model_version, sa.func.count())
                                              .where(predictions.c.scored_at >= since, sa.not_(ours))
                                              .group_by(night, predictions.c.model_version)).all():
            if str(n) in out:
                out[str(n)]["other_versions"][version] = int(count)
    day = sa.func.date(reviews.c.reviewed_at)
    reviewed = {str(n): int(c) for n, c in conn.execute(sa.select(day, sa.func.count())
                                                        .where(reviews.c.reviewed_at >= since).group_by(day)).all()}
    for n, row in out.items():
        row["reviewed"] = reviewed.get(n, 0)
    return {"nights": list(out.values()), "bins": bins, "entropy_max": math.log(2)}
