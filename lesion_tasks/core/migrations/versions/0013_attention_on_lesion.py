"""`predictions.attention_on_lesion`: the share of a prediction's Grad-CAM mass inside the lesion, from the
classical segmentation of `lesion_tasks/model/attention.py`; below half, the case is flagged
`attention_off_lesion`. Rows scored before stay NULL (their overlays hold a blended picture, not the map:
nothing to measure), as do images without a segmentable lesion. No view reads the column.

Revision ID: 0013_attention_on_lesion
Revises: 0012_decision_uncertainty
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_attention_on_lesion"
down_revision = "0012_decision_uncertainty"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("attention_on_lesion", sa.Float, nullable=True))


def downgrade() -> None:
    op.execute("ALTER TABLE predictions DROP COLUMN attention_on_lesion")
