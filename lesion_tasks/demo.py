"""`lesion demo`: the pipeline on the embedded defaults (SQLite + local store under LESION_HOME).

It ingests one drop, retrains with the `demo` profile (gate and champion included), scores every
image with the champion (MC dropout, Grad-CAM), and ends with the review queue and a SQL query.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from lesion_tasks import registry, retrain, scoring
from lesion_tasks.db import engine_for
from lesion_tasks.ingest import ingest
from lesion_tasks.settings import Settings
from lesion_tasks.synthetic import make_drop

log = logging.getLogger(__name__)

SAMPLE_QUERY = """SELECT image_id, predicted_label, ROUND(p_mel, 3) AS p_mel, ROUND(entropy, 3) AS entropy, review_reasons
FROM v_review_queue ORDER BY entropy DESC LIMIT 5"""


def run_demo(settings: Settings, data: Path | None) -> tuple[dict[str, Any], str]:
    if data is None:
        data = settings.home / "synthetic-drop"
        log.info("no DATA given: generating a SYNTHETIC ISIC-format drop in %s (drawn blobs, not dermoscopy)", data)
        make_drop(data, n_images=120)
    log.info("step 1/3: ingesting %s", data)
    ingested = ingest(str(data), settings).as_json()
    log.info("step 2/3: retraining with the demo profile")
    trained = retrain.run(settings, retrain.make_config("demo"))
    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            has_champion = registry.champion(conn) is not None
        if not has_champion:
            log.warning("no model passed the gate, so there is no champion: scoring with the rejected model %s "
                        "for the demo only (nightly scoring would refuse)", trained["model_version"])
        log.info("step 3/3: scoring every image")
        scored = scoring.score(settings, "champion" if has_champion else trained["model_version"])
        with engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(sa.text(SAMPLE_QUERY)).mappings()]
            queue = conn.execute(sa.text("SELECT COUNT(*) FROM v_review_queue")).scalar()
    finally:
        engine.dispose()
    t = trained["metrics"]["test"]
    table = "\n".join(f"  {r['image_id']}  {r['predicted_label']:<3}  p_mel {r['p_mel']}  entropy {r['entropy']}  "
                      f"{r['review_reasons']}" for r in rows)
    human = (
        f"ingested {data}: accepted {ingested['accepted']}, quarantined {ingested['quarantined']}, "
        f"duplicates {ingested['duplicates']} (drop totals {ingested['totals']})\n"
        f"trained {trained['model_version']}: test AUC {t['auc']:.3f}, melanoma sensitivity {t['mel_sensitivity']:.3f}, "
        f"specificity {t['mel_specificity']:.3f}, balanced accuracy {t['balanced_accuracy']:.3f} -> "
        f"{'PROMOTED to champion' if trained['promoted'] else 'NOT promoted'}\n"
        + "".join(f"  {r}\n" for r in trained["gate"]["reasons"])
        + f"scored {scored['scored']} images with {scored['model_version']}: {scored['needs_review']} need review; "
        f"review queue (v_review_queue, champion only): {queue}\n"
        f"report:   {trained['report_uri']}\n"
        f"database: {settings.describe()['db_url']}\nstore:    {settings.store_url}\n\n"
        f"{SAMPLE_QUERY}\n{table}"
    )
    return {"ingest": ingested, "train": trained, "score": scored, "review_queue": queue, "query": SAMPLE_QUERY,
            "rows": rows}, human
