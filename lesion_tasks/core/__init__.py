"""Core: settings, the database (SQLAlchemy engine, schema, Alembic migrations), the object store, keys and
reason codes -- what every other room stands on.
May import: nothing of lesion_tasks outside core."""
