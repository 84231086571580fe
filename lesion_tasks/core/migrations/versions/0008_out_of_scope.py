"""Out-of-scope signal: `predictions.p_other`, the probability that a lesion is neither melanoma nor nevus
(e.g. basal cell carcinoma), NULL for model versions without an out-of-scope head. `review_reasons` may
now hold `out_of_scope` too (the column is free text: nothing to migrate).

- `v_latest_predictions` and `v_review_queue` gain `p_other` as their last column; every other column
  keeps its name and position, so existing queries (and `SELECT *` consumers reading by position) work
  unchanged. `v_review_queue` now lists its columns instead of `v.*`, so that the new column of
  `v_latest_predictions` lands at its end and not in the middle.
- Both views are dropped and created (SQLite has no CREATE OR REPLACE VIEW; PostgreSQL refuses to
  reorder columns that way), which drops their grants on PostgreSQL: `lesion_reader` gets SELECT on
  them again, on upgrade and on downgrade.

Revision ID: 0008_out_of_scope
Revises: 0007_failed_drops
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_out_of_scope"
down_revision = "0007_failed_drops"
branch_labels = None
depends_on = None

ROLE = "lesion_reader"
VIEWS = ("v_latest_predictions", "v_review_queue")  # created in this order, dropped in the reverse

PREDICTION_COLUMNS = ("image_id", "model_version", "p_mel", "predicted_label", "threshold", "entropy", "mutual_info",
                      "mc_samples", "gradcam_uri", "needs_review", "review_reasons", "drop_id", "run_id", "scored_at")
CHAMPION = "FROM predictions p JOIN model_versions m ON m.model_version = p.model_version WHERE m.is_champion"
QUEUE_FROM = """FROM v_latest_predictions v JOIN images i ON i.image_id = v.image_id
        LEFT JOIN reviews r ON r.id = (SELECT max(id) FROM reviews x
                                       WHERE x.image_id = v.image_id AND x.model_version = v.model_version)
        WHERE v.needs_review"""
QUEUE_EXTRA = ("i.label AS known_label, i.lesion_id, i.patient_id, i.normalized_uri, i.original_uri, "
               "r.verdict AS review_verdict, r.label AS review_label, r.reviewer, r.reviewed_at")


def _views(with_p_other: bool) -> dict[str, str]:
    p_cols = ", ".join(f"p.{c}" for c in PREDICTION_COLUMNS)
    v_cols = ", ".join(f"v.{c}" for c in PREDICTION_COLUMNS)
    if not with_p_other:  # as 0003 and 0005 made them
        return {"v_latest_predictions": f"SELECT {p_cols} {CHAMPION}",
                "v_review_queue": f"SELECT {v_cols}, {QUEUE_EXTRA} {QUEUE_FROM}"}
    return {"v_latest_predictions": f"SELECT {p_cols}, p.p_other {CHAMPION}",
            "v_review_queue": f"SELECT {v_cols}, {QUEUE_EXTRA}, v.p_other {QUEUE_FROM}"}


def _drop_views() -> None:
    for name in reversed(VIEWS):  # the queue reads v_latest_predictions
        op.execute(f"DROP VIEW {name}")


def _create_views(with_p_other: bool) -> None:
    for name, sql in _views(with_p_other).items():
        op.execute(f"CREATE VIEW {name} AS {sql}")
    bind = op.get_bind()
    if bind.dialect.name == "postgresql" and bind.execute(
            sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE}).scalar():
        op.execute(f"GRANT SELECT ON {', '.join(VIEWS)} TO {ROLE}")  # a dropped view took its grants along


def upgrade() -> None:
    # views first: SQLite re-checks every view against the tables it reads when a table changes
    _drop_views()
    op.add_column("predictions", sa.Column("p_other", sa.Float, nullable=True))  # ALTER TABLE ADD COLUMN on both
    _create_views(with_p_other=True)


def downgrade() -> None:
    _drop_views()
    # a plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35): no copy of `predictions`, which, with foreign keys on,
    # would cascade-delete prediction_samples when the old table is dropped
    op.execute("ALTER TABLE predictions DROP COLUMN p_other")
    _create_views(with_p_other=False)
