"""The read-only role `lesion_reader`: reads predictions, the views, labels and verdicts; writes nothing; sees
no registry internals and no credentials."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from lesion_tasks.core import db


def test_reader_can_read_and_cannot_write(pg_url):
    db.upgrade(pg_url)
    login = f"analyst_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE ROLE {login} LOGIN"))
        conn.execute(sa.text(f"GRANT lesion_reader TO {login}"))
    reader = sa.create_engine(sa.engine.make_url(pg_url).set(username=login), isolation_level="AUTOCOMMIT")
    try:
        with reader.connect() as conn:
            for table in ("predictions", "v_latest_predictions", "v_review_queue", "images", "reviews", "v_reviewed_labels"):
                conn.execute(sa.text(f"SELECT * FROM {table} LIMIT 1")).all()
            for forbidden in ("INSERT INTO images (image_id) VALUES ('x')", "DELETE FROM predictions",
                              "UPDATE images SET label = 'MEL'", "DELETE FROM reviews", "SELECT * FROM model_versions",
                              "SELECT * FROM quarantine", "SELECT * FROM champion_history",
                              "SELECT rolpassword FROM pg_authid", "CREATE TABLE sneaky (x int)"):
                with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                    conn.execute(sa.text(forbidden))
    finally:
        reader.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP OWNED BY {login}"))
            conn.execute(sa.text(f"DROP ROLE {login}"))
        admin.dispose()
