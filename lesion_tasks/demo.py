"""The demo's two ends, without Airflow: put a drop where `isic_ingest` looks, and summarise.

`lesion demo` (tools/airflow_demo.py) runs the three DAGs through Airflow between the two.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from lesion_tasks.assessment.gate import Decision
from lesion_tasks.core.db import engine_for
from lesion_tasks.core.keys import slug
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import open_store
from lesion_tasks.ingest.sources import INCOMING_PREFIX
from lesion_tasks.ops.synthetic import make_drop
from lesion_tasks.versions import registry

log = logging.getLogger(__name__)

# the review UI's default order (`queue_rank`, NULL once reviewed): likely melanomas, unsure decisions, the rest
# (ROUND of a CAST AS NUMERIC: PostgreSQL has no ROUND(double precision, int); SQLite takes both)
SAMPLE_QUERY = """SELECT image_id, predicted_label, ROUND(CAST(p_mel AS NUMERIC), 3) AS p_mel,
       ROUND(CAST(threshold AS NUMERIC), 3) AS threshold,
       ROUND(CAST(decision_uncertainty AS NUMERIC), 2) AS decision_uncertainty,
       ROUND(CAST(p_other AS NUMERIC), 3) AS p_other, review_reasons
FROM v_review_queue WHERE queue_rank IS NOT NULL ORDER BY queue_rank LIMIT 5"""


def prepare_drop(settings: Settings, data: Path | None, n_synthetic: int = 700) -> str:
    """Copy `data` (a folder or .zip) under `incoming/` in the store; without data, a synthetic drop."""
    if data is None:
        data = settings.home / "synthetic-drop"
        log.warning("no DATA given: using a SYNTHETIC ISIC-format drop (%d drawn blobs, not dermoscopy) in %s",
                    n_synthetic, data)
        if not (data / "metadata.csv").exists():
            make_drop(data, n_images=n_synthetic, other_fraction=0.15)  # some out-of-scope lesions too
    data = Path(data).expanduser().resolve()
    store = open_store(settings)
    if data.is_file():
        if not zipfile.is_zipfile(data):
            raise ValueError(f"DATA={data}: expected an ISIC drop folder or a .zip")
        key = f"{INCOMING_PREFIX}{slug(data.stem)}.zip"
        store.put(key, data.read_bytes(), "application/zip")
    elif data.is_dir():
        key = f"{INCOMING_PREFIX}{slug(data.name)}"
        files = [p for p in sorted(data.rglob("*")) if p.is_file() and not p.is_symlink()]
        log.info("copying %d files of %s into the store at %s/", len(files), data, key)
        for path in files:
            store.put(f"{key}/{path.relative_to(data).as_posix()}", path.read_bytes())
        store.put(f"{key}/_READY", b"")
    else:
        raise ValueError(f"DATA={data}: no such folder or .zip")
    return store.uri(key)


def summary(settings: Settings) -> tuple[dict[str, Any], str]:
    """Where the report is, the review-queue size, and one SQL query with its result."""
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            champion = registry.version(conn, None, required=False)
            latest = next(iter(registry.versions(conn)), None)
            counts = dict(conn.execute(sa.text("SELECT 'images', COUNT(*) FROM images UNION ALL "
                                               "SELECT 'quarantined', COUNT(*) FROM quarantine UNION ALL "
                                               "SELECT 'predictions', COUNT(*) FROM v_latest_predictions UNION ALL "
                                               "SELECT 'review_queue', COUNT(*) FROM v_review_queue")).all())
            rows = [dict(r) for r in conn.execute(sa.text(SAMPLE_QUERY)).mappings()]
    finally:
        engine.dispose()
    reasons = Decision.from_json(latest.gate).reasons if latest else []
    report_key = champion.report_uri if champion else (latest.report_uri if latest else None)
    report_uri = open_store(settings).uri(report_key) if report_key else None
    table = "\n".join(f"  {r['image_id']}  {r['predicted_label']:<3}  p_mel {r['p_mel']} (threshold {r['threshold']})  across {r['decision_uncertainty']}  "
                      f"p_other {r['p_other']}  "
                      f"{r['review_reasons']}" for r in rows) or "  (empty)"
    human = (
        f"images accepted {counts['images']}, quarantined {counts['quarantined']}\n"
        f"latest model {latest.model_version if latest else None}: {latest.status if latest else '-'}\n"
        + "".join(f"  {r}\n" for r in reasons)
        + f"champion: {champion.model_version if champion else 'none (no model passed the gate)'}\n"
        f"report:   {report_uri}\n"
        f"scored {counts['predictions']} images with the champion; review queue: {counts['review_queue']}\n"
        f"review them: `make airflow`, then http://127.0.0.1:8080/lesion-review/ (or \"Lesion review\" in Airflow's menu)\n"
        f"database: {settings.describe()['db_url']}\nstore:    {settings.store_url}\n\n"
        f"{SAMPLE_QUERY}\n{table}"
    )
    payload = {"counts": counts, "champion": champion.model_version if champion else None,
               "report_uri": report_uri if champion else None, "query": SAMPLE_QUERY, "rows": rows}
    return payload, human
