"""`lesion demo`: the pipeline on the embedded defaults (SQLite + local store under LESION_HOME).

Today it runs what exists: ingestion and validation of one drop, then a sample SQL query.
Retraining and nightly scoring join it as they land.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from lesion_tasks.db import engine_for
from lesion_tasks.ingest import ingest
from lesion_tasks.settings import Settings
from lesion_tasks.synthetic import make_drop

log = logging.getLogger(__name__)

SAMPLE_QUERY = """SELECT COALESCE(label, 'unlabelled') AS label, COUNT(*) AS images
FROM images GROUP BY COALESCE(label, 'unlabelled') ORDER BY images DESC"""


def run_demo(settings: Settings, data: Path | None) -> tuple[dict[str, Any], str]:
    if data is None:
        data = settings.home / "synthetic-drop"
        log.info("no DATA given: generating a SYNTHETIC ISIC-format drop in %s (drawn blobs, not dermoscopy)", data)
        make_drop(data)
    result = ingest(str(data), settings).as_json()
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(sa.text(SAMPLE_QUERY)).mappings()]
    finally:
        engine.dispose()
    table = "\n".join(f"  {r['label']:<11} {r['images']}" for r in rows)
    human = (
        f"ingested {data}: accepted {result['accepted']}, quarantined {result['quarantined']}, "
        f"duplicates {result['duplicates']} (drop totals {result['totals']})\n"
        f"database: {settings.describe()['db_url']}\nstore:    {settings.store_url}\n\n"
        f"{SAMPLE_QUERY}\n{table}\n\n(retraining and nightly scoring are not part of the demo yet)"
    )
    return {"ingest": result, "query": SAMPLE_QUERY, "rows": rows}, human
