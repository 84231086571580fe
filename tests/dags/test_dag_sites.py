"""A new clinic through the DAGs, on PostgreSQL and S3: its unlabelled night arrives under
`incoming/<site>/<drop>/` (isic_ingest names the site from the layout), is scored by lesion_nightly_score
(whose summary says the night rests on an unvalidated site), `lesion sites` says `unvalidated`, its
validation sample is drawn and its labels imported with the real CLI, and lesion_retrain (Params) gives
the clinic labelled images in every split, a threshold chosen on its own images, test metrics of its
own and a status other than `unvalidated`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import sqlalchemy as sa

from lesion_tasks.core.schema import images, model_versions, site_evaluations
from lesion_tasks.core.store import open_store
from lesion_tasks.ops.synthetic import make_drop
from tests.helpers import mirror_home, run_cli, run_dag

DAGS = Path(__file__).resolve().parents[2] / "dags"
CLINIC = "clinic-x"


def _cli(settings, *args: str) -> dict:
    env = {"LESION_DB_URL": settings.db_url, "LESION_STORE_URL": settings.store_url,
           "LESION_S3_ENDPOINT": settings.s3_endpoint, "LESION_S3_ACCESS_KEY": settings.s3_access_key,
           "LESION_S3_SECRET_KEY": settings.s3_secret_key, "LESION_HOME": str(settings.home)}
    done = run_cli(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_a_new_clinic_through_the_dags_on_postgres_and_s3(airflow_env, trained_home, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    from lesion_tasks.scoring import nightly

    settings, decoy = airflow_env
    mirror_home(trained_home.settings, settings)  # the champion and its scored images, on PostgreSQL + S3
    drop = make_drop(tmp_path / "night-1", n_images=300, melanoma_fraction=0.3, seed=81)
    with open(drop / "metadata.csv") as fh:
        truth = {r["isic_id"]: "MEL" if "Melanoma" in r["diagnosis_2"] else "NV" for r in csv.DictReader(fh)}
    (drop / "metadata.csv").unlink()  # the clinic sends images only
    store = open_store(settings)
    for path in sorted(drop.iterdir()):
        store.put(f"incoming/{CLINIC}/night-1/{path.name}", path.read_bytes())
    bag = DagBag(dag_folder=str(DAGS))

    run, states = run_dag(bag.get_dag("isic_ingest"))
    assert run.state == "success", states
    engine = sa.create_engine(settings.db_url)
    with engine.connect() as conn:
        arrived = dict(conn.execute(sa.select(images.c.site, sa.func.count()).where(images.c.drop_id == f"{CLINIC}-night-1")
                                    .group_by(images.c.site)).all())
    assert arrived == {CLINIC: 300}

    run, states = run_dag(bag.get_dag("lesion_nightly_score"))
    assert run.state == "success", states
    night = nightly.summarize(settings, "champion", run.run_id, [])["sites"]
    assert night["mostly_unvalidated"] and night["unvalidated_sites"] == [CLINIC], night
    with engine.connect() as conn:  # the share of the new site flagged out of scope, as the summary says it
        reasons = list(conn.scalars(sa.text("SELECT p.review_reasons FROM predictions p JOIN images i ON i.image_id = "
                                            "p.image_id WHERE i.site = :s AND p.run_id = :r"), {"s": CLINIC, "r": run.run_id}))
    assert len(reasons) == 300
    assert night["out_of_scope_share_by_site"][CLINIC] == round(sum("out_of_scope" in (r or "") for r in reasons) / 300, 4)
    listed = {s["site"]: s for s in _cli(settings, "sites")["sites"]}
    assert listed[CLINIC]["status"] == "unvalidated" and listed[CLINIC]["images"] == 300

    sample = _cli(settings, "sites", "sample", CLINIC, "--size", "150")
    assert sample["site"] == CLINIC and sample["size"] == 150
    assert all(0 < r["inclusion_probability"] <= 1 for r in sample["images"])
    mel_share = sum(truth[r["image_id"]] == "MEL" for r in sample["images"]) / 150
    assert mel_share > sum(v == "MEL" for v in truth.values()) / len(truth), mel_share  # over-represented
    labels = tmp_path / "labels.csv"
    labels.write_text("image_id,diagnosis,label_source\n"
                      + "".join(f"{r['image_id']},{truth[r['image_id']]},histopathology\n" for r in sample["images"]))
    imported = _cli(settings, "labels", "import", str(labels))
    assert imported["imported"] == 150 and imported["rejected"] == 0, imported

    conf = {"profile": "demo", "backbone": "tiny", "image_size": 64, "weights": "none", "epochs": 60, "seed": 1,
            "mc_samples": 20, "target_sensitivity": 0.97}
    run, states = run_dag(bag.get_dag("lesion_retrain"), conf)
    assert states["train_model"] == states["evaluate_model"] == "success", states
    with engine.connect() as conn:
        row = conn.execute(sa.select(model_versions).where(model_versions.c.run_id == run.run_id)).mappings().one()
        evaluated = conn.execute(sa.select(site_evaluations.c.status, site_evaluations.c.chosen_on).where(
            site_evaluations.c.model_version == row["model_version"], site_evaluations.c.site == CLINIC)).one()
    engine.dispose()
    own = row["review_rule"]["thresholds_by_site"][CLINIC]
    assert own["chosen_on"] == "site" and own["method"].startswith("cross-fitted") and own["n_mel"] >= 10, own
    part = row["metrics"]["test"]["by_site"][CLINIC]
    assert part["n_mel"] > 0 and abs(part["threshold"] - own["threshold"]) < 1e-12, part
    assert evaluated.status != "unvalidated" and evaluated.chosen_on == "site"
    listed = {s["site"]: s for s in _cli(settings, "sites")["sites"]}
    assert listed[CLINIC]["status"] != "unvalidated" and min(listed[CLINIC]["labelled_by_split"].values()) > 0, listed[CLINIC]
    assert not decoy.exists()
