"""Airflow-side wiring shared by the DAGs and the review plugin (Airflow puts `plugins/` on sys.path).

Inside Airflow, the Connections `lesion_db` and `lesion_s3` take precedence over the LESION_*
environment variables; without them the environment (or the embedded defaults) applies.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

DB_CONN_ID = "lesion_db"
S3_CONN_ID = "lesion_s3"


def _connection(conn_id: str):
    from airflow.sdk import BaseHook

    try:
        return BaseHook.get_connection(conn_id)
    except Exception as exc:  # noqa: BLE001 - AirflowNotFoundException's home moved between releases
        if type(exc).__name__ != "AirflowNotFoundException":
            raise
        return None


def lesion_settings():
    """`lesion_tasks.settings.Settings` for a task: Connections first, then the environment."""
    from lesion_tasks.settings import Settings, db_url_from_connection, s3_overrides_from_connection

    overrides: dict = {}
    conn = _connection(DB_CONN_ID)
    if conn is not None:
        overrides["db_url"] = db_url_from_connection(
            conn.conn_type, conn.host, conn.port, conn.login, conn.password, conn.schema, conn.extra_dejson
        )
    conn = _connection(S3_CONN_ID)
    if conn is not None:
        overrides.update(s3_overrides_from_connection(conn.host, conn.port, conn.login, conn.password, conn.extra_dejson))
    settings = Settings.from_env(**overrides)
    log.info("lesion settings: %s (connections used: %s)", settings.describe(), sorted(k for k in overrides if overrides[k]))
    return settings
