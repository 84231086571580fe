"""Scoring: predictions (unique on image and model version) and the views people query.

Revision ID: 0003_predictions
Revises: 0002_registry
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_predictions"
down_revision = "0002_registry"
branch_labels = None
depends_on = None

COLUMNS = ("p.image_id, p.model_version, p.p_mel, p.predicted_label, p.threshold, p.entropy, p.mutual_info, "
           "p.mc_samples, p.gradcam_uri, p.needs_review, p.review_reasons, p.drop_id, p.run_id, p.scored_at")


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("image_id", sa.String(128), sa.ForeignKey("images.image_id"), primary_key=True),
        sa.Column("model_version", sa.String(128), sa.ForeignKey("model_versions.model_version"), primary_key=True),
        sa.Column("p_mel", sa.Float, nullable=False),
        sa.Column("predicted_label", sa.String(8), nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("entropy", sa.Float, nullable=False),
        sa.Column("mutual_info", sa.Float, nullable=False),
        sa.Column("mc_samples", sa.Integer, nullable=False),
        sa.Column("gradcam_uri", sa.Text, nullable=False),
        sa.Column("needs_review", sa.Boolean, nullable=False),
        sa.Column("review_reasons", sa.String(256), nullable=True),
        sa.Column("drop_id", sa.String(128), nullable=False),
        sa.Column("run_id", sa.String(256), nullable=False),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("predicted_label IN ('MEL', 'NV')", name="ck_predictions_label"),
    )
    op.create_index("ix_predictions_drop_id", "predictions", ["drop_id"])
    op.create_index("ix_predictions_run_id", "predictions", ["run_id"])
    # one row per image: the current champion's prediction
    op.execute(f"""CREATE VIEW v_latest_predictions AS
        SELECT {COLUMNS}
        FROM predictions p JOIN model_versions m ON m.model_version = p.model_version
        WHERE m.is_champion""")
    # what a clinician should look at, most uncertain first, with what is known of the image
    op.execute("""CREATE VIEW v_review_queue AS
        SELECT v.*, i.label AS known_label, i.lesion_id, i.patient_id, i.normalized_uri, i.original_uri
        FROM v_latest_predictions v JOIN images i ON i.image_id = v.image_id
        WHERE v.needs_review""")


def downgrade() -> None:
    op.execute("DROP VIEW v_review_queue")
    op.execute("DROP VIEW v_latest_predictions")
    op.drop_table("predictions")
