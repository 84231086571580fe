"""A reviewer (Airflow role `user`) cannot replace the champion by triggering `lesion_retrain` with a run
id that used to slug to the champion's version id (the champion's run id plus a trailing `.`): the run
gets a version of its own, and the champion's artifacts and registry row stay as they were."""

from __future__ import annotations

import hashlib

import sqlalchemy as sa

from lesion_tasks.core import keys
from lesion_tasks.core.schema import model_versions
from lesion_tasks.core.store import open_store
from tests.live.test_airflow_rest import TINY


def _champion(live) -> dict | None:
    engine = sa.create_engine(live.settings.db_url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(model_versions).where(model_versions.c.is_champion)).mappings().first()
    engine.dispose()
    return dict(row) if row else None


def _artifacts(live, version: str) -> dict[str, str]:
    store = open_store(live.settings)
    return {o.key: hashlib.sha256(store.get(o.key)).hexdigest() for o in store.list(keys.model_prefix(version))}


def test_a_colliding_run_id_cannot_overwrite_the_champion(live):
    session = live.session()
    champion = _champion(live)
    if champion is None:  # this file run alone: make one the normal way
        live.trigger_and_wait(session, "lesion_retrain", TINY)
        champion = _champion(live)
    before = _artifacts(live, champion["model_version"])
    assert {f"models/{champion['model_version']}/{n}" for n in ("model.keras", "head.npz", "report.html")} <= set(before)

    run_id = champion["run_id"] + "."
    # the paper's head: one epoch from random weights stays weak (the demo's ensemble fits its linear half in full)
    conf = TINY | {"epochs": 1, "weights": "none", "head": "mlp"}
    response = session.post(f"{live.base}/api/v2/dags/lesion_retrain/dagRuns",
                            json={"dag_run_id": run_id, "logical_date": None, "conf": conf}, timeout=10)
    assert response.ok, response.text
    url = f"{live.base}/api/v2/dags/lesion_retrain/dagRuns/{run_id}"
    live.wait(lambda: session.get(url, timeout=10).json()["state"] in ("success", "failed"), 600, f"run {run_id}")

    after = _champion(live)
    assert _artifacts(live, champion["model_version"]) == before, "the champion's artifacts changed"
    engine = sa.create_engine(live.settings.db_url)
    with engine.connect() as conn:
        old = conn.execute(sa.select(model_versions).where(model_versions.c.model_version == champion["model_version"])
                           ).mappings().one()
        new = conn.execute(sa.select(model_versions.c.model_version).where(model_versions.c.run_id == run_id)).scalars().all()
    engine.dispose()
    assert old["run_id"] == champion["run_id"] and old["metrics"] == champion["metrics"]
    assert old["model_uri"] == champion["model_uri"] and old["weights_sha256"] == champion["weights_sha256"]
    assert new and champion["model_version"] not in new, "the new run must own a version of its own"
    # the champion changes only through the gate (a one-epoch random model is not expected to pass it)
    assert after["model_version"] in (champion["model_version"], *new)
