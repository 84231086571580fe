"""Which model version's prediction an image shows: the champion's, else (until the champion has scored it) the
previous champion's. A promotion so never empties the review queue or `v_latest_predictions`: the new
champion's predictions replace the previous one's image by image as it scores them (`lesion_nightly_score`,
started by the promotion's Asset, the open cases and the latest nights first: `scoring.priority`)."""

from __future__ import annotations

import sqlalchemy as sa

from lesion_tasks.core.schema import champion_history, model_versions


def previous_champion(conn: sa.Connection) -> str | None:
    """The version the current champion replaced (its latest promotion's `previous`); None without one."""
    champion = sa.select(model_versions.c.model_version).where(model_versions.c.is_champion).scalar_subquery()
    return conn.scalar(sa.select(champion_history.c.previous).where(champion_history.c.model_version == champion)
                       .order_by(champion_history.c.at.desc(), champion_history.c.id.desc()).limit(1))
