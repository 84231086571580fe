"""What an outside probe of the running system found, each fixed at its cause: image ids validated in
full, long names that never block a drop, a failed drop that does not stop the others, bounded trigger
Params, a weights cache keyed by object version, near-linear near-duplicate grouping."""

from __future__ import annotations

import csv
import io
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from lesion_tasks.model.config import PROFILES, config_from_params, make_config
from lesion_tasks.model import backbones, evaluation
from lesion_tasks.core import db
from lesion_tasks.training import retrain
from lesion_tasks.ingest.entries import valid_image_id
from lesion_tasks.ingest.drop import ingest, ingest_one_of_many
from lesion_tasks.ingest.neardup import NearDupIndex
from lesion_tasks.core.schema import drops, images, predictions, quarantine
from lesion_tasks.core.store import open_store
from tests import imagegen as g
from tests import reliability
from tests.helpers import run_dag

DAGS = Path(__file__).resolve().parents[2] / "dags"


def _rows(settings, table, *cols):
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        out = conn.execute(sa.select(*(table.c[c] for c in cols))).all()
    engine.dispose()
    return [tuple(r) for r in out]


# --- image ids ----------------------------------------------------------------------------------

def test_image_ids_are_validated_in_full(tmp_path, local_settings):
    for bad in ("ISIC_9100000\n", "ISIC_9100000\r", " ISIC_1", "ISIC 1", "ISIC_1\x00", "ISIC_1\t", "", "_x", "x" * 129):
        assert not valid_image_id(bad), repr(bad)
    assert valid_image_id("ISIC_0000001") and valid_image_id("ISIC_0000001.v2-b")
    drop = tmp_path / "ids"
    drop.mkdir()
    (drop / "ISIC_9100000.jpg").write_bytes(g.jpeg(1))
    (drop / "ISIC_9100000\n.jpg").write_bytes(g.jpeg(2))  # a trailing newline: another file, not another id
    result = ingest(str(drop), local_settings)
    assert result.accepted == 1 and result.reasons == {"invalid_image_id": 1}
    assert _rows(local_settings, images, "image_id") == [("ISIC_9100000",)]
    assert _rows(local_settings, quarantine, "entry", "reason", "image_id") == [
        ("ISIC_9100000\n.jpg", "invalid_image_id", None)]
    reliability.record("Image ids with whitespace or control characters", "ISIC_9100000\\n.jpg next to ISIC_9100000.jpg",
                       "quarantined invalid_image_id; one image row", "1 accepted, 1 quarantined; CSV exports quoted", 0, 0)


def test_isic_csv_export_uses_the_csv_module():
    truth, pred = evaluation.isic_csvs(["ISIC_1", 'odd,"id"\nx'], np.array([1, 0]), np.array([0.9, 0.1]), 0.5)
    rows = list(csv.reader(io.StringIO(pred)))
    assert [r[0] for r in rows] == ["image", "ISIC_1", 'odd,"id"\nx'] and all(len(r) == 3 for r in rows)
    assert [r[0] for r in csv.reader(io.StringIO(truth))][1:] == ["ISIC_1", 'odd,"id"\nx']


# --- long names ---------------------------------------------------------------------------------

def test_long_file_names_never_block_a_drop(tmp_path, local_settings):
    """A 254-byte name on the sender's disk and >255-byte names inside a zip are quarantined (or kept as
    auxiliary files) under bounded keys; the good images of the same drop are accepted."""
    drop = tmp_path / "longnames"
    drop.mkdir()
    (drop / "ISIC_9200001.jpg").write_bytes(g.jpeg(3))
    long_local = "ISIC_" + "A" * 245 + ".jpg"  # 254 bytes: legal here, too long once prefixed by a hash
    (drop / long_local).write_bytes(g.jpeg(4))
    result = ingest(str(drop), local_settings)
    assert result.accepted == 1 and result.reasons == {"invalid_image_id": 1}

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ISIC_9200002.jpg", g.jpeg(5))
        zf.writestr("B" * 300 + ".jpg", g.jpeg(6))
        zf.writestr("licenses/" + "C" * 300 + ".txt", b"CC-BY")
        zf.writestr("ISIC_9200003." + "x" * 300, g.jpeg(7))  # a valid id with an absurd suffix
    (tmp_path / "longzip.zip").write_bytes(buf.getvalue())
    result = ingest(str(tmp_path / "longzip.zip"), local_settings)
    assert result.accepted == 2 and result.reasons == {"invalid_image_id": 1}
    store = open_store(local_settings)
    keys = [o.key for o in store.list("drops/")]
    assert max(len(part.encode()) for k in keys for part in k.split("/")) <= 120
    assert _rows(local_settings, drops, "drop_id", "status") == [("longnames", "complete"), ("longzip", "complete")]
    assert any(k.startswith("drops/longzip/aux/licenses/CCCC") for k in keys)
    reliability.record("File names longer than the file system allows", "254-byte name in a folder; 300-byte zip entries",
                       "quarantined or kept under bounded keys; the drop completes",
                       f"both drops complete; {result.accepted} accepted from the zip", 0, 0)


def test_a_failed_drop_is_recorded_and_the_others_still_publish(monkeypatch, embedded_airflow_env):
    """One drop that breaks ingestion (here: label evidence that raises) is marked failed with its reason;
    the good drop of the same run is ingested and published; the run ends failed, saying which drop."""
    from airflow.dag_processing.dagbag import DagBag

    from lesion_tasks.ingest import labels

    settings = embedded_airflow_env
    store = open_store(settings)
    for drop, ids in (("a-good", ("ISIC_9300001", "ISIC_9300002")), ("b-broken", ("ISIC_9399999",))):
        for k, image_id in enumerate(ids):
            store.put(f"incoming/{drop}/{image_id}.jpg", g.jpeg(10 + k + len(drop)))
        store.put(f"incoming/{drop}/_READY", b"")
    merge = labels.merge

    def broken(image_id, evidence):
        if image_id == "ISIC_9399999":
            raise RuntimeError("label evidence of ISIC_9399999 cannot be merged")
        return merge(image_id, evidence)

    monkeypatch.setattr(labels, "merge", broken)
    run, states = run_dag(DagBag(dag_folder=str(DAGS)).get_dag("isic_ingest"))
    assert states["publish"] == "success" and states["check_drops"] == "failed", states
    assert run.state == "failed"
    rows = {r[0]: r[1:] for r in _rows(settings, drops, "drop_id", "status", "error")}
    assert rows["a-good"] == ("complete", None)
    assert rows["b-broken"][0] == "failed" and "cannot be merged" in rows["b-broken"][1]
    assert [r[0] for r in _rows(settings, images, "image_id")] == ["ISIC_9300001", "ISIC_9300002"]
    # fixed, the next run resumes the failed drop and clears its error
    monkeypatch.setattr(labels, "merge", merge)
    assert ingest_one_of_many("incoming/b-broken", settings)["accepted"] == 1
    assert {r[0]: r[1:] for r in _rows(settings, drops, "drop_id", "status", "error")}["b-broken"] == ("complete", None)
    reliability.record("One drop of a run breaks ingestion", "RuntimeError while merging one drop's labels",
                       "that drop marked failed with its reason; the other drop ingested and published; run failed",
                       "publish success, check_drops failed; rerun completes the drop", 0, 0)


# --- trigger Params -----------------------------------------------------------------------------

@pytest.mark.parametrize("conf, message", [
    ({"views": 500}, "not Params of this DAG"),
    ({"floors": {"auc": 0}}, "not Params of this DAG"),
    ({"seed": 2**64}, r"seed=18446744073709551616 is out of range: expected 0 to 2147483647"),
    ({"seed": -1}, "seed=-1 is out of range"),
    ({"epochs": 0}, "epochs=0 is out of range"),
    ({"mc_samples": "50"}, "mc_samples='50': expected an integer"),
    ({"target_sensitivity": 0.2}, "target_sensitivity=0.2 is out of range"),
    ({"profile": "fast"}, "profile 'fast'"),
])
def test_trigger_params_are_declared_and_bounded(conf, message):
    params = {"profile": "demo", "backbone": None, "epochs": None, "image_size": None, "weights": "imagenet",
              "seed": 0, "mc_samples": 50, "target_sensitivity": 0.85}
    with pytest.raises(ValueError, match=message):
        config_from_params(params | conf)
    assert config_from_params(params).views == PROFILES["demo"].views


def test_bad_params_fail_in_the_first_task_before_any_work(airflow_env):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(DAGS)).get_dag("lesion_retrain")
    run, states = run_dag(dag, {"profile": "demo", "backbone": "tiny", "weights": "none", "bootstrap": -1})
    assert run.state == "failed" and states["prepare_split"] == "failed"
    assert states["train_model"] in ("upstream_failed", None)
    reliability.record("Undeclared or out-of-range retrain Params", "conf bootstrap=-1 (undeclared); seed 2**64, -1, "
                       "strings for integers (unit)", "refused with the value and the range, before any work",
                       "prepare_split failed; train_model never ran", 0, 0)
    run, states = run_dag(dag, {"profile": "demo", "backbone": "tiny", "weights": "/etc/passwd"})
    tries = {ti.task_id: ti.try_number for ti in run.get_task_instances()}
    assert run.state == "failed" and states["prepare_split"] == "failed" and tries["prepare_split"] == 1
    assert states["train_model"] in ("upstream_failed", None)
    reliability.record("Unusable weights in the retrain form", "weights=/etc/passwd from the form (unit: ../, file://, "
                       "another bucket, http://127.0.0.1, paper profile without ResNet weights, tiny with imagenet)",
                       "refused by prepare_split, once, without retry, before the TensorFlow slot",
                       "prepare_split failed on its first try; train_model never ran", 0, 0)


@pytest.mark.parametrize("weights", ["/etc/passwd", "../../../etc/passwd", "file:///etc/passwd",
                                     "s3://another-bucket/weights.h5", "http://127.0.0.1/weights.h5"])
def test_unusable_weights_fail_prepare_split_before_the_split(weights, local_settings, monkeypatch):
    monkeypatch.setenv("LESION_WEIGHTS_DOWNLOAD", "0")
    with pytest.raises(ValueError, match="weights|store"):
        retrain.prepare_split(local_settings, make_config("demo", backbone="tiny", weights=weights))


def test_weights_a_backbone_cannot_have_are_refused_not_replaced(local_settings, monkeypatch, tmp_path):
    monkeypatch.setenv("LESION_WEIGHTS_DOWNLOAD", "0")
    monkeypatch.setenv("LESION_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(ValueError, match="backbone 'tiny' has no ImageNet weights"):  # was: effnet_lite0, a warning
        retrain.prepare_split(local_settings, make_config("demo", backbone="tiny"))
    with pytest.raises(ValueError, match="resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        retrain.prepare_split(local_settings, make_config("paper"))
    # the demo profile's own backbone still falls back, and says so in the result
    checked = retrain.check_weights(local_settings, make_config("demo"))
    assert checked["backbone"] == "effnet_lite0"
    assert checked["fallback"] == "mobilenet025_multiscale has no ImageNet weights here: effnet_lite0 is trained instead"
    reliability.record("A backbone its weights cannot serve", "backbone tiny with weights imagenet from the form",
                       "refused by prepare_split (was: effnet_lite0 trained with a warning line)",
                       "ValueError 'backbone tiny has no ImageNet weights'; the demo's own fallback named in the result",
                       0, 0)


# --- weights cache ------------------------------------------------------------------------------

def test_weights_cache_is_keyed_by_object_not_file_name(tmp_path, local_settings):
    """Resolving incoming/x/<name> (anyone's bytes) then weights/<name> must not return the first file's
    bytes; an updated object is fetched again."""
    store = open_store(local_settings)
    tiny = backbones.get_backbone("tiny")
    cache = tmp_path / "cache"
    store.put("incoming/x/model.weights.h5", b"attacker bytes")
    store.put("weights/model.weights.h5", b"legitimate bytes")
    first = backbones.resolve_weights(f"{store.url}/incoming/x/model.weights.h5", tiny, cache, store)
    second = backbones.resolve_weights(f"{store.url}/weights/model.weights.h5", tiny, cache, store)
    assert Path(second.path).read_bytes() == b"legitimate bytes" and first.sha256 != second.sha256
    again = backbones.resolve_weights(f"{store.url}/weights/model.weights.h5", tiny, cache, store)
    assert again.path == second.path  # cached: not fetched twice
    import os
    import time

    store.put("weights/model.weights.h5", b"updated bytes!")
    path = store.root / "weights/model.weights.h5"
    os.utime(path, (time.time() + 5, time.time() + 5))  # a later modification, whatever the clock's resolution
    updated = backbones.resolve_weights(f"{store.url}/weights/model.weights.h5", tiny, cache, store)
    assert Path(updated.path).read_bytes() == b"updated bytes!"
    reliability.record("Weights cache poisoning", "incoming/x/<name>.h5 resolved before weights/<name>.h5; object updated",
                       "each object's own bytes; an update fetched again", "distinct cache entries per object version", 0, 0)


# --- near-duplicate grouping ----------------------------------------------------------------------

def _naive(hashes, lesions, max_distance=2):
    groups = []
    by_lesion = {}
    for i, (h, lesion) in enumerate(zip(hashes, lesions)):
        cands = [groups[j] for j in range(i) if bin(hashes[j] ^ h).count("1") <= max_distance]
        if lesion in by_lesion:
            cands.append(by_lesion[lesion])
        group = min(cands) if cands else f"ISIC_{i:05d}"
        by_lesion.setdefault(lesion, group) if lesion else None
        groups.append(group)
    return groups


def test_near_duplicate_index_equals_the_pairwise_definition():
    rng = random.Random(3)
    bases = [rng.getrandbits(64) for _ in range(40)]
    hashes, lesions = [], []
    for _ in range(1500):
        h = rng.choice(bases)
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            h ^= 1 << rng.randrange(64)
        hashes.append(h)
        lesions.append(rng.choice([None] * 8 + [f"IL_{rng.randrange(30)}"]))
    index = NearDupIndex()
    got = [index.assign(f"ISIC_{i:05d}", h, lesion) for i, (h, lesion) in enumerate(zip(hashes, lesions))]
    assert got == _naive(hashes, lesions)
    assert len(set(got)) < len(got)  # the data does have groups
    reliability.record("Many images sharing one perceptual hash", "1,500 clustered hashes vs the pairwise definition; "
                       "bench/neardup_grouping.py for 100,000 identical hashes", "same groups, near-linear time",
                       "groups equal the pairwise definition", 0, 0)


# --- model artifacts ----------------------------------------------------------------------------

def _double(x):
    return x * 2


def test_a_model_naming_a_python_function_is_a_named_artifact_error(trained_home, home_copy, tmp_path):
    """A .keras whose Lambda layer names a function (TypeError inside Keras' safe loading) stops scoring
    with the artifact's name, before anything is written."""
    import keras

    from lesion_tasks.versions import artifacts
    from lesion_tasks.scoring import nightly as scoring

    inp = keras.Input((4,))
    keras.Model(inp, keras.layers.Lambda(_double)(inp)).save(tmp_path / "lambda.keras")
    store = open_store(home_copy)
    store.put(f"models/{trained_home.version}/model.keras", (tmp_path / "lambda.keras").read_bytes())
    engine = db.make_engine(home_copy.db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM prediction_samples"))
        conn.execute(sa.text("DELETE FROM predictions"))
    engine.dispose()
    with pytest.raises(artifacts.ArtifactError, match=r"model.keras is unreadable \(TypeError.*nothing written"):
        scoring.score(home_copy, run_id="lambda")
    assert _rows(home_copy, predictions, "image_id") == []
    reliability.record("Model artifact naming a Python function", "champion model.keras with Lambda(_double)",
                       "scoring stops with the artifact named; nothing written", "ArtifactError 'unreadable (TypeError'; 0 rows", 0, 0)
