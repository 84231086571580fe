"""Ingestion tables: drops, images, quarantine.

Revision ID: 0001_ingest
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_ingest"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drops",
        sa.Column("drop_id", sa.String(128), primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("layout", sa.String(128), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("n_entries", sa.Integer, nullable=False),
        sa.Column("accepted", sa.Integer, nullable=False, server_default="0"),
        sa.Column("quarantined", sa.Integer, nullable=False, server_default="0"),
        sa.Column("duplicates", sa.Integer, nullable=False, server_default="0"),
        sa.Column("reasons", sa.JSON, nullable=True),
        sa.Column("manifest_uri", sa.Text, nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('running', 'complete')", name="ck_drops_status"),
    )
    op.create_table(
        "images",
        sa.Column("image_id", sa.String(128), primary_key=True),
        sa.Column("drop_id", sa.String(128), sa.ForeignKey("drops.drop_id"), nullable=False),
        sa.Column("source_entry", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("label", sa.String(8), nullable=True),
        sa.Column("diagnosis", sa.Text, nullable=True),
        sa.Column("label_source", sa.String(128), nullable=True),
        sa.Column("lesion_id", sa.String(128), nullable=True),
        sa.Column("patient_id", sa.String(128), nullable=True),
        sa.Column("near_dup_group", sa.String(128), nullable=False),
        sa.Column("phash", sa.String(16), nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("n_bytes", sa.BigInteger, nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("conversions", sa.String(128), nullable=True),
        sa.Column("original_uri", sa.Text, nullable=False),
        sa.Column("normalized_uri", sa.Text, nullable=False),
        sa.Column("normalized_size", sa.Integer, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=True),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("label IS NULL OR label IN ('MEL', 'NV', 'OTHER')", name="ck_images_label"),
        sa.UniqueConstraint("sha256", name="uq_images_sha256"),
    )
    op.create_index("ix_images_drop_id", "images", ["drop_id"])
    op.create_index("ix_images_label", "images", ["label"])
    op.create_index("ix_images_lesion_id", "images", ["lesion_id"])
    op.create_index("ix_images_near_dup_group", "images", ["near_dup_group"])
    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("drop_id", sa.String(128), sa.ForeignKey("drops.drop_id"), nullable=False),
        sa.Column("entry", sa.Text, nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("image_id", sa.String(128), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("raw_uri", sa.Text, nullable=True),
        sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("drop_id", "entry", name="uq_quarantine_drop_entry"),
    )
    op.create_index("ix_quarantine_drop_id", "quarantine", ["drop_id"])
    op.create_index("ix_quarantine_reason", "quarantine", ["reason"])


def downgrade() -> None:
    op.drop_table("quarantine")
    op.drop_table("images")
    op.drop_table("drops")
