"""Alembic environment: runs against the URL set by `lesion_tasks.core.db.upgrade`."""

from alembic import context

from lesion_tasks.core.db import VERSION_TABLE, make_engine
from lesion_tasks.core.schema import metadata

config = context.config


def run_migrations_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=metadata,
                version_table=VERSION_TABLE,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported: run `lesion db upgrade`")
run_migrations_online()
