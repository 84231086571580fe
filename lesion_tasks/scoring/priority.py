"""What a new champion scores first: the images a reviewer waits for. After a promotion the queue shows the previous
champion's open cases until the new champion has scored them (`versions.succession`), so they go first, then the
latest nights' images (drops finished within RECENT of the newest), then the rest in id order."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from lesion_tasks.core.schema import drops, images, predictions, reviews
from lesion_tasks.versions import succession

RECENT = timedelta(days=2)
MAX_FIRST = 5_000  # image ids carried in the plan's shards (XCom): the rest go by id range


def first_to_score(conn: sa.Connection, unscored: list[str]) -> list[str]:
    """Of the champion's `unscored` images: the previous champion's open cases (flagged, no verdict), then the
    images of the latest nights; at most MAX_FIRST, each once."""
    todo, first = set(unscored), {}
    previous = succession.previous_champion(conn)
    if previous is not None:
        reviewed = sa.select(reviews.c.image_id)
        first.update(dict.fromkeys(conn.scalars(
            sa.select(predictions.c.image_id).where(predictions.c.model_version == previous, predictions.c.needs_review,
                                                    predictions.c.image_id.not_in(reviewed))
            .order_by(predictions.c.image_id))))
    newest = conn.scalar(sa.select(sa.func.max(drops.c.finished_at)))
    if newest is not None:
        recent = sa.select(drops.c.drop_id).where(drops.c.finished_at >= newest - RECENT)
        first.update(dict.fromkeys(conn.scalars(sa.select(images.c.image_id).where(images.c.drop_id.in_(recent))
                                                .order_by(images.c.image_id))))
    return [i for i in first if i in todo][:MAX_FIRST]
