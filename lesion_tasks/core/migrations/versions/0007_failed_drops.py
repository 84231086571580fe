"""A drop whose ingestion failed says so: `drops.status` may be `failed`, with the reason in `drops.error`.

Revision ID: 0007_failed_drops
Revises: 0006_portable_refs
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_failed_drops"
down_revision = "0006_portable_refs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drops") as batch:
        batch.add_column(sa.Column("error", sa.Text, nullable=True))
        batch.drop_constraint("ck_drops_status", type_="check")
        batch.create_check_constraint("ck_drops_status", "status IN ('running', 'complete', 'failed')")


def downgrade() -> None:
    op.execute("UPDATE drops SET status = 'running' WHERE status = 'failed'")  # a rerun picks them up again
    with op.batch_alter_table("drops") as batch:
        batch.drop_constraint("ck_drops_status", type_="check")
        batch.create_check_constraint("ck_drops_status", "status IN ('running', 'complete')")
        batch.drop_column("error")
