"""Airflow-side wiring shared by the DAGs and the review plugin (Airflow puts `plugins/` on sys.path).

Inside Airflow, the Connections `lesion_db` and `lesion_s3` take precedence over the LESION_*
environment variables; without them the environment (or the embedded defaults) applies.
"""

from __future__ import annotations

import logging

from airflow.sdk import Asset

log = logging.getLogger(__name__)

DB_CONN_ID = "lesion_db"
S3_CONN_ID = "lesion_s3"
# emitted by isic_ingest when it accepted new images; lesion_nightly_score runs on it (as well as at 02:00)
VALIDATED_IMAGES = Asset("lesion://images/validated")
# emitted by lesion_retrain when it promoted a new champion; lesion_nightly_score runs on it too, so the new
# champion scores the open cases and the latest nights first (the queue shows the previous champion's meanwhile)
CHAMPION_PROMOTED = Asset("lesion://models/champion")
# TensorFlow tasks (train_model, evaluate_model, score_shard): slots = machines (workers), since a TensorFlow
# process holds 1-3 GB and every core of its machine (`airflow pools set lesion_tensorflow N`)
TF_POOL = "lesion_tensorflow"


def _connection(conn_id: str):
    from airflow.sdk import BaseHook

    try:
        return BaseHook.get_connection(conn_id)
    except Exception as exc:  # noqa: BLE001 - AirflowNotFoundException's home moved between releases
        if type(exc).__name__ != "AirflowNotFoundException":
            raise
        return None


def lesion_settings():
    """`lesion_tasks.core.settings.Settings` for a task: Connections first, then the environment."""
    from lesion_tasks.core.settings import Settings, db_url_from_connection, s3_overrides_from_connection

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


# --- TensorFlow's start-up noise --------------------------------------------------------------------
# A task's stderr is logged at ERROR level by the Task SDK's supervisor, and TensorFlow's C++ start-up
# lines go there: absl's "All log messages before absl::InitializeLog()", the oneDNN notice (TF 2.21 logs
# it through absl, which TF_CPP_MIN_LOG_LEVEL does not reach) and cpu_feature_guard (which it does).
TF_NOISE = ("absl::InitializeLog()", "oneDNN custom operations are on", "cpu_feature_guard",
            "To enable the following instructions:", "rebuild TensorFlow with the appropriate compiler flags")


def quiet_tensorflow() -> None:
    """Import TensorFlow with its C++ start-up lines kept out of the task log: TF_CPP_MIN_LOG_LEVEL=2
    unless set, and, unless the user asked for TensorFlow's INFO lines (TF_CPP_MIN_LOG_LEVEL=0), the lines
    of TF_NOISE dropped from what the import writes to stderr; anything else it writes passes through.
    Call it in a TensorFlow task before anything imports TensorFlow (a no-op once imported)."""
    import importlib
    import os
    import sys
    import tempfile

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    if os.environ["TF_CPP_MIN_LOG_LEVEL"].strip() in ("", "0"):
        importlib.import_module("tensorflow")  # asked for everything
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            importlib.import_module("tensorflow")
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines()
                    if line.strip() and not any(noise in line for noise in TF_NOISE)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


# --- alerts -----------------------------------------------------------------------------------------
# Off by default: on once the Connection `lesion_alerts_smtp` (type smtp) exists. Recipients: its extra
# "to" (a list or comma-separated), else the Variable `lesion_alerts_to`; sender: extra "from_email".
ALERTS_CONN_ID = "lesion_alerts_smtp"
ALERTS_TO_VARIABLE = "lesion_alerts_to"
_said_alerts_off = False


def _recipients(conn) -> list[str]:
    to = (conn.extra_dejson or {}).get("to")
    if not to:
        try:
            from airflow.sdk import Variable

            to = Variable.get(ALERTS_TO_VARIABLE, default=None)
        except Exception as exc:  # noqa: BLE001 - no Variable backend reachable (e.g. a bare callback)
            log.debug("Variable %s not readable: %s", ALERTS_TO_VARIABLE, exc)
    if isinstance(to, str):
        to = to.split(",")
    return [a.strip() for a in to or [] if a and a.strip()]


def airflow_url() -> str:
    """The Airflow UI's base URL: [api] base_url, else http://<[api] host>:<[api] port>."""
    try:
        from airflow.sdk.configuration import conf
    except ImportError:  # pragma: no cover - older layouts
        from airflow.configuration import conf
    base = conf.get("api", "base_url", fallback=None)
    if not base:
        host = conf.get("api", "host", fallback="localhost")
        base = f"http://{'localhost' if host in ('', '0.0.0.0', '::') else host}:{conf.get('api', 'port', fallback='8080')}"
    return base.rstrip("/")


def alert_links(context, model_version: str | None = None) -> dict[str, str]:
    """The Airflow run, and with a model version its report and the review queue (Lesion review UI)."""
    from urllib.parse import quote

    base = airflow_url()
    dag = context.get("dag")
    dag_id = getattr(dag, "dag_id", None) or context.get("dag_id") or "unknown"
    links = {"Airflow run": f"{base}/dags/{dag_id}/runs/{quote(str(context.get('run_id') or ''), safe='')}"}
    if model_version:
        links["Model report"] = f"{base}/lesion-review/models/{quote(model_version, safe='')}/report"
        links["Review queue"] = f"{base}/lesion-review/"
    return links


def send_alert(context, alert) -> bool:
    """Send `alert` (a `lesion_tasks.ops.alerts.Alert`) through Airflow's SmtpNotifier and the Connection
    `lesion_alerts_smtp`. Without the Connection alerts are off (said once per process). Never raises: a
    mail server that is down must not fail the pipeline; it is logged as an error."""
    global _said_alerts_off
    try:
        conn = _connection(ALERTS_CONN_ID)
    except Exception:  # noqa: BLE001
        log.exception("alert %s not sent: the Connection %s could not be read", alert.kind, ALERTS_CONN_ID)
        return False
    if conn is None:
        if not _said_alerts_off:
            log.info("alerts are off (no Connection %s): not sending %r", ALERTS_CONN_ID, alert.subject)
            _said_alerts_off = True
        return False
    to = _recipients(conn)
    if not to:
        log.error("alert %s not sent: Connection %s has no recipients (extra 'to' or Variable %s)",
                  alert.kind, ALERTS_CONN_ID, ALERTS_TO_VARIABLE)
        return False
    try:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        notifier = SmtpNotifier(to=to, from_email=(conn.extra_dejson or {}).get("from_email") or "lesion-alerts@localhost",
                                subject=alert.subject, html_content=alert.html(), smtp_conn_id=ALERTS_CONN_ID)
        notifier.notify(context)  # not notifier(context): the text is sent as is, never rendered as a template
    except Exception:  # noqa: BLE001
        log.exception("alert %s could not be sent to %s through %s", alert.kind, to, ALERTS_CONN_ID)
        return False
    log.info("alert %s sent to %s: %s", alert.kind, to, alert.subject)
    return True


def nightly_failed_callback(context) -> None:
    """`lesion_nightly_score`'s on_failure_callback: one alert per failed run."""
    from lesion_tasks.ops import alerts

    version = None
    try:
        version = alerts.champion_version(lesion_settings())
    except Exception as exc:  # noqa: BLE001 - the alert goes out without the version
        log.warning("champion unknown for the failure alert: %s", exc)
    ti = context.get("ti") or context.get("task_instance")
    failed = []
    if ti is not None:
        index = getattr(ti, "map_index", -1)
        failed.append(f"{ti.task_id}{f'[{index}]' if index is not None and index >= 0 else ''}")
    send_alert(context, alerts.nightly_failed(str(context.get("run_id")), version, failed, context.get("reason"),
                                              alert_links(context, version)))
