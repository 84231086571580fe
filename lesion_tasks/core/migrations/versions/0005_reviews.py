"""Review UI: reviewer verdicts, the MC samples behind each prediction, the queue with its review state.

- `reviews`: one row per verdict (history kept; the latest per image counts), who and when, the
  prediction it was given on. A reviewer's label becomes training data for the next retrain where
  ISIC gave none; it never overwrites `images.label`.
- `prediction_samples`: the T per-sample p(MEL) values of each prediction (the case page's MC
  distribution), written with the prediction.
- `v_reviewed_labels`: the latest reviewer label per image.
- `v_review_queue` gains the latest verdict on the champion's prediction (columns appended).
- indexes for the UI's queries: predictions by (model_version, needs_review) and by scored_at.

Revision ID: 0005_reviews
Revises: 0004_reader_role
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_reviews"
down_revision = "0004_reader_role"
branch_labels = None
depends_on = None

ROLE = "lesion_reader"
OLD_QUEUE = """SELECT v.*, i.label AS known_label, i.lesion_id, i.patient_id, i.normalized_uri, i.original_uri
        FROM v_latest_predictions v JOIN images i ON i.image_id = v.image_id
        WHERE v.needs_review"""
NEW_QUEUE = """SELECT v.*, i.label AS known_label, i.lesion_id, i.patient_id, i.normalized_uri, i.original_uri,
               r.verdict AS review_verdict, r.label AS review_label, r.reviewer, r.reviewed_at
        FROM v_latest_predictions v JOIN images i ON i.image_id = v.image_id
        LEFT JOIN reviews r ON r.id = (SELECT max(id) FROM reviews x
                                       WHERE x.image_id = v.image_id AND x.model_version = v.model_version)
        WHERE v.needs_review"""
REVIEWED_LABELS = """SELECT r.image_id, r.label, r.verdict, r.model_version, r.reviewer, r.reviewed_at, r.id AS review_id
        FROM reviews r WHERE r.id = (SELECT max(id) FROM reviews x WHERE x.image_id = r.image_id)"""


def _reader_exists(bind) -> bool:
    return bind.dialect.name == "postgresql" and bool(
        bind.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE}).scalar())


def _replace_queue(sql: str) -> None:
    # dropped and created (SQLite has no CREATE OR REPLACE VIEW; Postgres refuses to drop columns that way)
    op.execute("DROP VIEW v_review_queue")
    op.execute(f"CREATE VIEW v_review_queue AS {sql}")


def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("submission_id", sa.String(64), nullable=False),
        sa.Column("image_id", sa.String(128), sa.ForeignKey("images.image_id"), nullable=False),
        sa.Column("model_version", sa.String(128), sa.ForeignKey("model_versions.model_version"), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("label", sa.String(8), nullable=False),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("reviewer", sa.String(256), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("p_mel", sa.Float, nullable=False),
        sa.Column("predicted_label", sa.String(8), nullable=False),
        sa.CheckConstraint("verdict IN ('agree', 'disagree', 'set_label')", name="ck_reviews_verdict"),
        sa.CheckConstraint("label IN ('MEL', 'NV', 'OTHER')", name="ck_reviews_label"),
        sa.UniqueConstraint("submission_id", name="uq_reviews_submission"),
    )
    op.create_index("ix_reviews_image_id", "reviews", ["image_id"])
    op.create_table(
        "prediction_samples",
        sa.Column("image_id", sa.String(128), primary_key=True),
        sa.Column("model_version", sa.String(128), primary_key=True),
        sa.Column("p_mel_samples", sa.JSON, nullable=False),
        sa.ForeignKeyConstraint(["image_id", "model_version"], ["predictions.image_id", "predictions.model_version"],
                            ondelete="CASCADE"),
    )
    op.create_index("ix_predictions_version_review", "predictions", ["model_version", "needs_review"])
    op.create_index("ix_predictions_scored_at", "predictions", ["scored_at"])
    op.execute(f"CREATE VIEW v_reviewed_labels AS {REVIEWED_LABELS}")
    _replace_queue(NEW_QUEUE)
    bind = op.get_bind()
    if _reader_exists(bind):
        op.execute(f"GRANT SELECT ON v_review_queue, v_reviewed_labels, reviews TO {ROLE}")


def downgrade() -> None:
    _replace_queue(OLD_QUEUE)
    op.execute("DROP VIEW v_reviewed_labels")
    op.drop_table("prediction_samples")
    op.drop_index("ix_predictions_scored_at", "predictions")
    op.drop_index("ix_predictions_version_review", "predictions")
    op.drop_index("ix_reviews_image_id", "reviews")
    op.drop_table("reviews")
    if _reader_exists(op.get_bind()):
        op.execute(f"GRANT SELECT ON v_review_queue TO {ROLE}")
