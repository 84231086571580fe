"""`label_imports` is an append-only log of import runs: each entry carries its run (`run_id`), one per
(run, line) instead of one per (file, line), so a rerun that applies a label the first run could not
(its image arrived in between) logs `imported` instead of leaving `rejected unknown_image` standing.
Entries logged before this revision were each their file's only run: their `run_id` is their file's sha256.
Downgrading keeps the latest entry of each (file, line).

Revision ID: 0017_label_import_runs
Revises: 0016_site_operating_points
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0017_label_import_runs"
down_revision = "0016_site_operating_points"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("label_imports") as batch:
        batch.add_column(sa.Column("run_id", sa.String(64), nullable=True))
    op.execute("UPDATE label_imports SET run_id = file_sha256")
    with op.batch_alter_table("label_imports") as batch:
        batch.alter_column("run_id", existing_type=sa.String(64), nullable=False)
        batch.drop_constraint("uq_label_imports_file_line", type_="unique")
        batch.create_unique_constraint("uq_label_imports_run_line", ["run_id", "line"])
        batch.create_index("ix_label_imports_file_line", ["file_sha256", "line"])


def downgrade() -> None:
    op.execute("DELETE FROM label_imports WHERE id NOT IN "
               "(SELECT MAX(id) FROM label_imports GROUP BY file_sha256, line)")
    with op.batch_alter_table("label_imports") as batch:
        batch.drop_index("ix_label_imports_file_line")
        batch.drop_constraint("uq_label_imports_run_line", type_="unique")
        batch.create_unique_constraint("uq_label_imports_file_line", ["file_sha256", "line"])
        batch.drop_column("run_id")
