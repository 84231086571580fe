"""Retention (`lesion gc`, retention.py): a pruned model version's Grad-CAM overlays are deleted, so

- `predictions.gradcam_uri` becomes nullable (NULL: the overlay was removed by `lesion gc`; the
  prediction's numbers stay);
- `model_versions.artifacts_pruned_at` (nullable) records when the version's heavy artifacts went:
  such a version can no longer score nor be promoted.

The views select `gradcam_uri` but only its nullability changes: they are left as they are (same
columns, same positions) and so are `lesion_reader`'s grants on them. PostgreSQL: `ALTER COLUMN ...
DROP NOT NULL`. SQLite cannot alter a column: the usual table copy would DROP `predictions`, whose
implicit DELETE cascades to `prediction_samples` (foreign keys are on); instead the table's definition
is edited in place, the procedure SQLite documents for removing a NOT NULL constraint ("Making Other
Kinds Of Table Schema Changes": writable_schema, schema_version + 1, integrity check), no row copied.

Downgrade gives NULL overlays back their deterministic key (`predictions/<version>/gradcam/<drop>/<id>.png`;
the object stays deleted, `lesion check` reports it) before NOT NULL returns, and drops the column.

Revision ID: 0009_retention
Revises: 0008_out_of_scope
Create Date: 2026-11-26
"""

import re

import sqlalchemy as sa
from alembic import op

revision = "0009_retention"
down_revision = "0008_out_of_scope"
branch_labels = None
depends_on = None


def _sqlite_set_not_null(table: str, column: str, not_null: bool) -> None:
    bind = op.get_bind()
    sql = bind.execute(sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :t"), {"t": table}).scalar()
    pattern = re.compile(rf"(\b{column} TEXT)( NOT NULL)?(?=\s*,)")
    new, n = pattern.subn(lambda m: m.group(1) + (" NOT NULL" if not_null else ""), sql)
    if n != 1:
        raise RuntimeError(f"{table}.{column}: expected one '{column} TEXT' in the table's definition, found {n}:\n{sql}")
    if new == sql:
        return
    version = bind.execute(sa.text("PRAGMA schema_version")).scalar()
    bind.execute(sa.text("PRAGMA writable_schema = ON"))
    try:
        bind.execute(sa.text("UPDATE sqlite_master SET sql = :sql WHERE type = 'table' AND name = :t"), {"sql": new, "t": table})
        bind.execute(sa.text(f"PRAGMA schema_version = {int(version) + 1}"))
    finally:
        bind.execute(sa.text("PRAGMA writable_schema = OFF"))
    check = bind.execute(sa.text("PRAGMA integrity_check")).scalars().all()
    if check != ["ok"]:
        raise RuntimeError(f"integrity check after editing {table}: {check[:5]}")


def _set_gradcam_not_null(not_null: bool) -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_set_not_null("predictions", "gradcam_uri", not_null)
    else:
        op.execute(f"ALTER TABLE predictions ALTER COLUMN gradcam_uri {'SET' if not_null else 'DROP'} NOT NULL")


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("artifacts_pruned_at", sa.DateTime(timezone=True), nullable=True))
    _set_gradcam_not_null(False)


def downgrade() -> None:
    op.execute("UPDATE predictions SET gradcam_uri = 'predictions/' || model_version || '/gradcam/' || drop_id || '/' "
               "|| image_id || '.png' WHERE gradcam_uri IS NULL")
    _set_gradcam_not_null(True)
    op.execute("ALTER TABLE model_versions DROP COLUMN artifacts_pruned_at")
