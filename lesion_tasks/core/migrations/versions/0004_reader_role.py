"""PostgreSQL read-only role `lesion_reader`: SELECT on predictions, the views and the label table.

Analysts get it with `GRANT lesion_reader TO <login role>`. It sees no registry internals, no
quarantine paths, nothing it could write. SQLite has no roles: nothing to do there.

Revision ID: 0004_reader_role
Revises: 0003_predictions
Create Date: 2026-11-26
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = "0004_reader_role"
down_revision = "0003_predictions"
branch_labels = None
depends_on = None

ROLE = "lesion_reader"
READABLE = ("predictions", "v_latest_predictions", "v_review_queue", "images")
log = logging.getLogger("alembic.runtime.migration")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    exists = bind.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE}).scalar()
    if not exists:
        may_create = bind.execute(sa.text("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user")).scalar()
        if not may_create:
            log.warning("role %s does not exist and %s may not create roles: ask an admin to run "
                        "'CREATE ROLE %s NOLOGIN' and rerun `lesion db upgrade` (grants skipped)", ROLE, "current_user", ROLE)
            return
        op.execute(f"CREATE ROLE {ROLE} NOLOGIN")
    op.execute(f"GRANT USAGE ON SCHEMA public TO {ROLE}")
    op.execute(f"GRANT SELECT ON {', '.join(READABLE)} TO {ROLE}")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql" and bind.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE}).scalar():
        op.execute(f"REVOKE SELECT ON {', '.join(READABLE)} FROM {ROLE}")
