"""A verdict records the p(other) its reviewer was shown: `reviews.p_other` (nullable: NULL where the
model version has no out-of-scope head, and for verdicts recorded before this revision), beside the
`p_mel` and `predicted_label` reviews already keep. No view reads `reviews.*`, so the views and their
grants stay as they are; a plain ALTER TABLE ADD / DROP COLUMN on both dialects (SQLite >= 3.35), no
table copy.

Revision ID: 0010_review_p_other
Revises: 0009_retention
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_review_p_other"
down_revision = "0009_retention"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("reviews", sa.Column("p_other", sa.Float, nullable=True))


def downgrade() -> None:
    op.execute("ALTER TABLE reviews DROP COLUMN p_other")
