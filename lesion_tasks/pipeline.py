"""The retrain pipeline, the one entry point: its four steps in order, each called by name by `lesion_retrain`'s tasks
(passing only the model version between them), and `run`, the four in one process (`lesion train`, the demo, the
tests and the benchmarks).

1. `prepare_split`: the weights checked (a run that could not train fails here, before anything is written), then
   the train/val/test split frozen or extended by its recorded rule (`training.retrain`).
2. `train_model`: features, head, calibration, thresholds, out-of-scope head, artifacts, the registry row.
3. `evaluate_model`: every metric on validation and the frozen test split, figures, the report (`assessment.assess`).
4. `gate_model`: the quality gate against the evidence, the floors and the champion; promotion (`assessment.gate`).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from lesion_tasks.assessment.assess import evaluate_model, gate_model
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import open_store
from lesion_tasks.model.config import TrainConfig
from lesion_tasks.training.retrain import prepare_split, train_model


def run(settings: Settings, config: TrainConfig, run_id: str | None = None, actor: str = "lesion train") -> dict[str, Any]:
    """The whole retrain in one process (what `lesion train --json` prints): the four steps of `lesion_retrain`."""
    started = time.monotonic()
    run_id = run_id or f"cli-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    split = prepare_split(settings, config)
    trained = train_model(settings, config, run_id)
    evaluated = evaluate_model(settings, trained["model_version"])
    gated = gate_model(settings, trained["model_version"], actor=actor)
    return {
        "model_version": trained["model_version"], "promoted": gated["promoted"], "threshold": trained["threshold"],
        "thresholds_by_site": trained["thresholds_by_site"],
        "metrics": evaluated["metrics"], "gate": {"reasons": gated["reasons"], "checks": gated["checks"],
                                                  "champion": gated["champion"]},
        "report_uri": open_store(settings).uri(evaluated["report_uri"]), "feature_cache": trained["feature_cache"],
        "head_seconds": trained["head_seconds"], "weights": trained["weights"], "split": split["counts"],
        "backbone": trained["backbone"], "weights_fallback": split["weights"]["fallback"],
        "wall_seconds": round(time.monotonic() - started, 1),
    }
