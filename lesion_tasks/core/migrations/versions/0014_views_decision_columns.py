"""`v_latest_predictions` and `v_review_queue` gain `decision_uncertainty` and `attention_on_lesion` as their
last columns, so the views keep every column of `predictions` (DESIGN: "with the same columns") and SQL users
can sort the queue as the review UI does (`ORDER BY decision_uncertainty DESC`). Every other column keeps its
name and position (as 0008 and 0011 did); the two views are dropped and created (`v_sites` is untouched) and
`lesion_reader` gets SELECT on them again (a dropped view takes its grants along). The view SQL is a frozen
copy of 0011's: a migration never imports the live schema or another migration.

Revision ID: 0014_views_decision_columns
Revises: 0013_attention_on_lesion
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0014_views_decision_columns"
down_revision = "0013_attention_on_lesion"
branch_labels = None
depends_on = None

ROLE = "lesion_reader"
PREDICTION_COLUMNS = ("image_id", "model_version", "p_mel", "predicted_label", "threshold", "entropy", "mutual_info",
                      "mc_samples", "gradcam_uri", "needs_review", "review_reasons", "drop_id", "run_id", "scored_at")
NEW_COLUMNS = ("decision_uncertainty", "attention_on_lesion")
CHAMPION = "FROM predictions p JOIN model_versions m ON m.model_version = p.model_version"
QUEUE_FROM = """FROM v_latest_predictions v JOIN images i ON i.image_id = v.image_id
        LEFT JOIN reviews r ON r.id = (SELECT max(id) FROM reviews x
                                       WHERE x.image_id = v.image_id AND x.model_version = v.model_version)
        WHERE v.needs_review"""
QUEUE_EXTRA = ("i.label AS known_label, i.lesion_id, i.patient_id, i.normalized_uri, i.original_uri, "
               "r.verdict AS review_verdict, r.label AS review_label, r.reviewer, r.reviewed_at")


def _views(with_new: bool) -> dict[str, str]:
    """The views in creation order (the queue reads v_latest_predictions); without the new columns as 0011 made them."""
    p_cols = ", ".join(f"p.{c}" for c in PREDICTION_COLUMNS)
    v_cols = ", ".join(f"v.{c}" for c in PREDICTION_COLUMNS)
    p_new = "".join(f", p.{c}" for c in NEW_COLUMNS) if with_new else ""
    v_new = "".join(f", v.{c}" for c in NEW_COLUMNS) if with_new else ""
    return {"v_latest_predictions": f"SELECT {p_cols}, p.p_other, i.site, COALESCE(s.status, 'unvalidated') AS site_status"
                                    f"{p_new} {CHAMPION} JOIN images i ON i.image_id = p.image_id "
                                    "LEFT JOIN v_sites s ON s.site = i.site WHERE m.is_champion",
            "v_review_queue": f"SELECT {v_cols}, {QUEUE_EXTRA}, v.p_other, v.site, v.site_status{v_new} {QUEUE_FROM}"}


def _recreate(with_new: bool) -> None:
    views = _views(with_new)
    for name in reversed(list(views)):
        op.execute(f"DROP VIEW {name}")
    for name, sql in views.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")
    bind = op.get_bind()
    if bind.dialect.name == "postgresql" and bind.execute(
            sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE}).scalar():
        op.execute(f"GRANT SELECT ON {', '.join(views)} TO {ROLE}")


def upgrade() -> None:
    _recreate(with_new=True)


def downgrade() -> None:
    _recreate(with_new=False)  # before 0013's downgrade drops attention_on_lesion, which the views then read
