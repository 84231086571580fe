"""Training: splits, model_versions (the registry), champion_history.

Revision ID: 0002_registry
Revises: 0001_ingest
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_registry"
down_revision = "0001_ingest"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "splits",
        sa.Column("image_id", sa.String(128), sa.ForeignKey("images.image_id"), primary_key=True),
        sa.Column("split", sa.String(8), nullable=False),
        sa.Column("rule", sa.String(128), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("split IN ('train', 'val', 'test')", name="ck_splits_split"),
    )
    op.create_index("ix_splits_split", "splits", ["split"])
    op.create_table(
        "model_versions",
        sa.Column("model_version", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("profile", sa.String(32), nullable=False),
        sa.Column("backbone", sa.String(64), nullable=False),
        sa.Column("image_size", sa.Integer, nullable=False),
        sa.Column("threshold", sa.Float, nullable=True),
        sa.Column("mc_samples", sa.Integer, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("environment", sa.JSON, nullable=False),
        sa.Column("weights_source", sa.Text, nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=True),
        sa.Column("lineage", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=True),
        sa.Column("gate", sa.JSON, nullable=True),
        sa.Column("review_rule", sa.JSON, nullable=True),
        sa.Column("model_uri", sa.Text, nullable=True),
        sa.Column("report_uri", sa.Text, nullable=True),
        sa.Column("metrics_uri", sa.Text, nullable=True),
        sa.Column("code_version", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(256), nullable=False),
        sa.Column("is_champion", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.CheckConstraint("status IN ('training', 'candidate', 'champion', 'retired', 'rejected')",
                           name="ck_model_versions_status"),
    )
    op.create_index("ix_model_versions_status", "model_versions", ["status"])
    op.create_index("uq_one_champion", "model_versions", ["is_champion"], unique=True,
                    sqlite_where=sa.text("is_champion"), postgresql_where=sa.text("is_champion"))
    op.create_table(
        "champion_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_version", sa.String(128), sa.ForeignKey("model_versions.model_version"), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("previous", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("event IN ('promoted', 'override')", name="ck_champion_history_event"),
    )


def downgrade() -> None:
    op.drop_table("champion_history")
    op.drop_index("uq_one_champion", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_table("splits")
