"""`lesion demo`: the pipeline on the embedded defaults (SQLite + local store under LESION_HOME).

Today it runs what exists: ingestion and validation of one drop, a retrain with the `demo` profile
(gate and champion included), then a sample SQL query. Nightly scoring joins it when it lands.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from lesion_tasks import retrain
from lesion_tasks.db import engine_for
from lesion_tasks.ingest import ingest
from lesion_tasks.settings import Settings
from lesion_tasks.synthetic import make_drop

log = logging.getLogger(__name__)

SAMPLE_QUERY = """SELECT model_version, status, ROUND(threshold, 4) AS threshold, weights_source
FROM model_versions ORDER BY created_at DESC"""


def run_demo(settings: Settings, data: Path | None) -> tuple[dict[str, Any], str]:
    if data is None:
        data = settings.home / "synthetic-drop"
        log.info("no DATA given: generating a SYNTHETIC ISIC-format drop in %s (drawn blobs, not dermoscopy)", data)
        make_drop(data, n_images=120)
    log.info("step 1/2: ingesting %s", data)
    ingested = ingest(str(data), settings).as_json()
    log.info("step 2/2: retraining with the demo profile")
    trained = retrain.run(settings, retrain.make_config("demo"))
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(sa.text(SAMPLE_QUERY)).mappings()]
    finally:
        engine.dispose()
    t = trained["metrics"]["test"]
    table = "\n".join(f"  {r['model_version']}  {r['status']:<9} {r['threshold']}  {r['weights_source'][:60]}" for r in rows)
    human = (
        f"ingested {data}: accepted {ingested['accepted']}, quarantined {ingested['quarantined']}, "
        f"duplicates {ingested['duplicates']} (drop totals {ingested['totals']})\n"
        f"trained {trained['model_version']}: test AUC {t['auc']:.3f}, melanoma sensitivity {t['mel_sensitivity']:.3f}, "
        f"specificity {t['mel_specificity']:.3f}, balanced accuracy {t['balanced_accuracy']:.3f} -> "
        f"{'PROMOTED to champion' if trained['promoted'] else 'NOT promoted'}\n"
        + "".join(f"  {r}\n" for r in trained["gate"]["reasons"])
        + f"report:   {trained['report_uri']}\n"
        f"database: {settings.describe()['db_url']}\nstore:    {settings.store_url}\n\n"
        f"{SAMPLE_QUERY}\n{table}\n\n(nightly scoring is not part of the demo yet)"
    )
    return {"ingest": ingested, "train": trained, "query": SAMPLE_QUERY, "rows": rows}, human
