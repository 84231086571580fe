"""`site_operating_points`: each model version's operating point at each site (`lesion_tasks.sites.operating`):
the threshold scoring decides the site's cases at, how it was chosen ("pooled", "unlabelled" from the site's
own scored images, "labelled") and what it promises (`point`, the JSON `lesion sites --json` shows). Analysts
may read it (`lesion_reader`). Nothing migrates: a version's points are estimated at its next scoring run.

Revision ID: 0016_site_operating_points
Revises: 0015_typed_records
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0016_site_operating_points"
down_revision = "0015_typed_records"
branch_labels = None
depends_on = None
ROLE = "lesion_reader"


def upgrade() -> None:
    op.create_table(
        "site_operating_points",
        sa.Column("model_version", sa.String(128), sa.ForeignKey("model_versions.model_version"), primary_key=True),
        sa.Column("site", sa.String(128), primary_key=True),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("out_of_scope_above", sa.Float, nullable=True),
        sa.Column("point", sa.JSON, nullable=False),
        sa.Column("run_id", sa.String(250), nullable=True),
        sa.Column("estimated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("method IN ('pooled', 'unlabelled', 'labelled')", name="ck_site_operating_points_method"),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql" and bind.execute(
            sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE}).scalar():
        op.execute(f"GRANT SELECT ON site_operating_points TO {ROLE}")


def downgrade() -> None:
    op.drop_table("site_operating_points")
