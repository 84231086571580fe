"""Sites: a site for every image (precedence, store layout, conflicts), the validation sample (melanomas
over-represented, inclusion probabilities recorded, extended never redrawn), labels imported later (reason
codes, reruns change nothing), and the whole flow on a new clinic: unlabelled drop with --site ->
`unvalidated` -> sample -> labels import -> retrain -> the site has labelled images in its splits, its own
threshold, `metrics.test.by_site.<site>` and a status other than `unvalidated`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import sqlalchemy as sa

from lesion_tasks import cli, pipeline
from lesion_tasks.core import db
from lesion_tasks.core.schema import images, label_imports, site_samples, splits
from lesion_tasks.ingest import label_import
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.ingest.sources import SiteConflict, _is_site_folder, layout_site, resolve_site
from lesion_tasks.sites import status as sites
from lesion_tasks.model import evaluation
from lesion_tasks.ops.synthetic import make_drop
from tests.helpers import LABELLED_DROP, NIGHT_DROP

pytestmark = pytest.mark.unit
CLINIC = "clinic-x"


def test_site_precedence_and_conflicts():
    assert resolve_site(None, None, None, "drop-1") == "drop-1"
    assert resolve_site(None, None, "clinic", "drop-1") == "clinic"
    assert resolve_site(None, "Clinic A", None, "d") == "Clinic-A"
    assert resolve_site("clinic", "clinic", "clinic", "d") == "clinic"
    with pytest.raises(SiteConflict, match=r"site_conflict.*--site 'a'.*site.txt 'b'"):
        resolve_site("a", "b", None, "d")
    with pytest.raises(SiteConflict, match="store layout"):
        resolve_site(None, "b", "c", "d")
    assert layout_site("incoming/clinic/night-2.zip") == ("clinic", "night-2")
    assert layout_site("incoming/clinic/night-2/") == ("clinic", "night-2")
    assert layout_site("incoming/drop") is None and layout_site("/data/clinic/night") is None


def test_store_layout_tells_a_site_folder_from_a_drop():
    assert _is_site_folder(["night-1/a.jpg", "night-2.zip"])
    assert not _is_site_folder(["a.jpg", "night-1/b.jpg"])  # images directly inside: a drop
    assert not _is_site_folder(["metadata.csv", "images/a.jpg"])  # a challenge drop
    assert not _is_site_folder(["images/a.jpg"])  # a challenge drop without its CSV
    assert not _is_site_folder(["night-1/_READY", "_READY"])


def test_weighted_threshold_and_metrics_reduce_to_the_unweighted_ones():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(int)
    p = np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1)
    for target in (0.8, 0.85, 0.9, 1.0):
        assert evaluation.threshold_for_sensitivity(y, p, target, np.ones(300)) == evaluation.threshold_for_sensitivity(y, p, target)
    t = evaluation.threshold_for_sensitivity(y, p, 0.85)
    plain, weighted = evaluation.binary_metrics(y, p, t), evaluation.binary_metrics(y, p, t, np.ones(300))
    for key in ("auc", "mel_sensitivity", "mel_specificity", "balanced_accuracy", "accuracy"):
        assert weighted[key] == pytest.approx(plain[key])
    # weights move the estimate: melanomas counted 3x in the lower half of the scores lower the sensitivity
    w = np.where((y == 1) & (p < np.median(p[y == 1])), 3.0, 1.0)
    assert evaluation.binary_metrics(y, p, t, w)["mel_sensitivity"] < plain["mel_sensitivity"]
    assert evaluation.threshold_for_sensitivity(y, p, 0.85, w) <= t


def test_imported_diagnoses():
    assert label_import.parse_diagnosis("MEL") == ("MEL", "MEL")
    assert label_import.parse_diagnosis("unk") == ("OTHER", "UNK")
    assert label_import.parse_diagnosis("BCC") == ("OTHER", "BCC")
    assert label_import.parse_diagnosis("nevus")[0] == "NV"
    for bad in ("", "XYZ", "unknown"):
        with pytest.raises(ValueError):
            label_import.parse_diagnosis(bad)


def _truth(drop) -> dict[str, str]:
    with open(drop / "metadata.csv") as fh:
        return {r["isic_id"]: ("MEL" if "Melanoma" in r["diagnosis_2"] else "NV") for r in csv.DictReader(fh)}


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "diagnosis", "label_source"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def clinic(trained_home, tmp_path_factory):
    """A copy of the trained home plus an unlabelled drop of 400 images from a new clinic (`--site`)."""
    from tests.helpers import copy_home

    tmp = tmp_path_factory.mktemp("sites")
    settings = copy_home(trained_home.settings, tmp / "home")
    drop = make_drop(tmp / "night-1", n_images=400, melanoma_fraction=0.25, seed=77)
    truth = _truth(drop)
    (drop / "metadata.csv").unlink()  # the clinic sends images only
    result = ingest(str(drop), settings, site=CLINIC)
    assert result.site == CLINIC and result.accepted == 400
    return settings, truth, tmp


def test_a_new_clinic_is_unvalidated_and_existing_sites_are_their_drops(clinic):
    settings, _, _ = clinic
    listed = {s["site"]: s for s in sites.overview(settings)["sites"]}
    assert listed[CLINIC]["status"] == "unvalidated" and listed[CLINIC]["labelled"] == 0
    assert "validation sample" in listed[CLINIC]["needed"]
    assert listed[CLINIC]["threshold"]["chosen_on"] == "pooled"
    assert listed[NIGHT_DROP]["status"] == "unvalidated"  # the night drop: no labels, its own drop id as site
    assert listed[LABELLED_DROP]["status"] != "unvalidated"


def test_validation_sample_over_represents_melanomas_and_extends(clinic):
    settings, truth, _ = clinic
    first = cli.sample_site(settings, CLINIC, 100)
    assert first["size"] == 100 and first["drawn_by"]  # the champion's p_mel set the size measure
    ids = [r["image_id"] for r in first["images"]]
    assert len(set(ids)) == 100 and all(0 < r["inclusion_probability"] <= 1 for r in first["images"])
    share = np.mean([truth[i] == "MEL" for i in ids])
    assert share > 1.4 * np.mean([v == "MEL" for v in truth.values()]), share
    strata = [r["stratum"] for r in first["images"]]
    assert 0.3 < strata.count("top_p_mel_quintile") / 100 < 0.7
    assert cli.sample_site(settings, CLINIC, 100)["images"] == first["images"]  # the same call: the same sample
    bigger = cli.sample_site(settings, CLINIC, 200)
    assert [r["image_id"] for r in bigger["images"][:100]] == ids  # extended, not redrawn
    # probabilities now those of a sample of 200: about twice as large for the same stratum
    pi = {r["image_id"]: r["inclusion_probability"] for r in bigger["images"]}
    assert pi[ids[0]] == pytest.approx(min(1.0, 2 * first["images"][0]["inclusion_probability"]), rel=1e-6)
    with pytest.raises(ValueError, match="no images; known sites"):
        cli.sample_site(settings, "nowhere", 10)


def test_drawing_a_sample_scores_that_sites_images_only(trained_home, tmp_path):
    """The size measure needs the champion's p_mel on the site's images: those are scored first, and another
    site's unscored backlog is left for its night (it once scored the whole home)."""
    from lesion_tasks.core.schema import predictions
    from tests.helpers import copy_home

    settings = copy_home(trained_home.settings, tmp_path / "home")
    for site, n, seed in (("clinic-a", 40, 5), ("clinic-b", 30, 6)):
        drop = make_drop(tmp_path / site, n_images=n, melanoma_fraction=0.25, seed=seed)
        (drop / "metadata.csv").unlink()
        assert ingest(str(drop), settings, site=site).accepted == n
    assert cli.sample_site(settings, "clinic-a", 10)["size"] == 10
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        scored = dict(conn.execute(sa.select(images.c.site, sa.func.count(predictions.c.image_id))
                                   .outerjoin(predictions, predictions.c.image_id == images.c.image_id)
                                   .where(images.c.site.in_(["clinic-a", "clinic-b"])).group_by(images.c.site)).all())
    engine.dispose()
    assert scored == {"clinic-a": 40, "clinic-b": 0}, scored


def test_labels_import_reason_codes_and_rerun(clinic):
    settings, truth, tmp = clinic
    sample = cli.sample_site(settings, CLINIC, 200)["images"]
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        isic_mel = conn.scalar(sa.select(images.c.image_id).where(images.c.label == "MEL").limit(1))
    engine.dispose()
    rows = [(r["image_id"], truth[r["image_id"]], "histopathology") for r in sample]
    bcc = rows[-1][0]
    rows[-1] = (bcc, "UNK", "panel")  # an out-of-scope lesion of unknown kind
    rows += [(rows[0][0], "NV", ""), ("ISIC_NOPE", "MEL", ""), (rows[1][0] + "x", "MEL", ""),
             (isic_mel, "NV", ""), (sample[0]["image_id"] + "", "MEL", "")]
    rows.insert(5, ("", "XYZ", ""))  # unknown diagnosis and no image: the image is unknown first
    path = _write_csv(tmp / "labels.csv", rows)
    result = label_import.import_labels(path, settings)
    assert result["imported"] == 200
    assert result["reasons"] == {"duplicate_row": 2, "unknown_image": 3, "conflicts_with_isic": 1}
    assert result["rejected"] == 6 and result["unchanged"] == 0
    again = label_import.import_labels(path, settings)
    assert again["imported"] == 0 and again["unchanged"] == 200 and again["reasons"] == result["reasons"]
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        assert conn.execute(sa.select(images.c.label, images.c.diagnosis, images.c.label_source)
                            .where(images.c.image_id == bcc)).one() == ("OTHER", "UNK", "import:panel")
        assert conn.scalar(sa.select(images.c.label).where(images.c.image_id == isic_mel)) == "MEL"  # never applied
        assert conn.scalar(sa.select(sa.func.count()).select_from(label_imports)) == len(rows)  # once per line
        assert conn.scalar(sa.select(sa.func.count()).select_from(label_imports)
                           .where(label_imports.c.reason == "conflicts_with_isic")) == 1
    engine.dispose()
    bad = tmp / "bad.csv"
    bad.write_text("isic,dx\nISIC_1,MEL\n")
    with pytest.raises(ValueError, match="expected image_id,diagnosis"):
        label_import.import_labels(bad, settings)


def test_retrain_validates_the_clinic_on_its_own_labels(clinic, trained_home):
    """After the import, a retrain splits the clinic's labelled images by lesion into train/val/test,
    chooses its own threshold on its validation images (IPW-weighted) and reports its test metrics."""
    settings, truth, _ = clinic
    result = pipeline.run(settings, trained_home.config, run_id="after-import")
    own = result["thresholds_by_site"][CLINIC]
    assert own["chosen_on"] == "site" and own["n_mel"] >= 10, own
    # cross-fitted: out-of-fold scores over all of its labelled train+val images, the target reached on them
    # (IPW-weighted), which is more melanomas than its validation split alone holds
    assert own["method"].startswith("cross-fitted (") and own["weighted"], own
    assert own["validation"]["mel_sensitivity"] >= 0.85 - 1e-9, own
    # its own calibration was weighed against the pooled one on cross-validated log-loss, and the call recorded
    cal = own["calibration"]
    assert isinstance(cal["applied"], bool) and set(cal["log_loss"]) == {"pooled", "site"}, cal
    assert cal["applied"] == (cal["gain"] > 1.645 * cal["gain_se"]) == own["method"].endswith("calibrated per site")
    assert result["thresholds_by_site"][NIGHT_DROP]["chosen_on"] == "pooled"
    part = result["metrics"]["test"]["by_site"][CLINIC]
    assert part["n_mel"] > 0 and part["threshold"] == pytest.approx(own["threshold"])
    listed = {s["site"]: s for s in sites.overview(settings)["sites"]}
    clinic_row = listed[CLINIC]
    assert clinic_row["status"] != "unvalidated"
    assert min(clinic_row["labelled_by_split"].values()) > 0, clinic_row
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        n_split = conn.scalar(sa.select(sa.func.count()).select_from(splits).join(images, images.c.image_id == splits.c.image_id)
                              .where(images.c.site == CLINIC))
        assert n_split == 200
        assert conn.scalar(sa.select(sa.func.count()).select_from(site_samples)) == 200
    engine.dispose()
    if result["promoted"]:
        from lesion_tasks.scoring import nightly

        nightly.score(settings, run_id="night-after-import")
        night = nightly.summarize(settings, "champion", "night-after-import", [])["sites"]
        assert night["images_by_status"][clinic_row["status"]] >= 400 and not night["failing_sites"], night
        engine = db.make_engine(settings.db_url)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT site, site_status, threshold FROM v_latest_predictions WHERE site = :s"),
                                {"s": CLINIC}).all()
        engine.dispose()
        assert len(rows) == 400 and {r.site_status for r in rows} == {clinic_row["status"]}
        assert {round(r.threshold, 9) for r in rows} == {round(own["threshold"], 9)}
    print(json.dumps({"site": clinic_row, "threshold": own}, default=str))


def test_a_night_mostly_from_unvalidated_sites_says_so():
    from lesion_tasks.ops import alerts
    from lesion_tasks.sites.nights import night_sites

    quiet = night_sites({"a": {"status": "validated", "images": 60}, "b": {"status": "unvalidated", "images": 40}})
    assert not quiet["mostly_unvalidated"] and quiet["unvalidated_share"] == 0.4 and "note" not in quiet
    loud = night_sites({"a": {"status": "validated", "images": 40}, "b": {"status": "unvalidated", "images": 50},
                        "c": {"status": "unvalidated", "images": 10}, "d": {"status": "failing", "images": 3}})
    assert loud["mostly_unvalidated"] and loud["unvalidated_sites"] == ["b", "c"] and loud["failing_sites"] == ["d"]
    assert loud["images_by_status"] == {"unvalidated": 60, "provisional": 0, "validated": 40, "failing": 3}
    assert loud["note"].startswith("60 of 103 images tonight (58%) come from sites the model was never validated at (b, c)")
    alert = alerts.unvalidated_night({"model_version": "v1", "run_id": "r1", "sites": loud}, {})
    assert alert.kind == "unvalidated_night" and "unvalidated 60, validated 40, failing 3" in alert.text()
    assert night_sites({})["unvalidated_share"] == 0.0


def test_discovery_finds_drops_inside_site_folders_and_ingest_names_their_site(tmp_path):
    """incoming/<site>/<drop>/ and incoming/<site>/<drop>.zip are drops of <site>; other first-level
    entries are drops; the layout's site reaches the images, and a contradicting --site fails the drop."""
    import io
    import zipfile

    from lesion_tasks.core.settings import Settings
    from lesion_tasks.core.store import open_store
    from lesion_tasks.ingest.sources import discover_incoming
    from tests.imagegen import jpeg

    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home"), "LESION_INCOMING_SETTLE_SECONDS": "0"})
    db.upgrade(settings)
    store = open_store(settings)
    store.put("incoming/clinic-a/night-1/ISIC_5000001.jpg", jpeg(1))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ISIC_5000002.jpg", jpeg(2))
    store.put("incoming/clinic-a/night-2.zip", buf.getvalue())
    store.put("incoming/plain-drop/ISIC_5000003.jpg", jpeg(3))
    ready = discover_incoming(settings, store)
    assert ready == ["incoming/clinic-a/night-1", "incoming/clinic-a/night-2.zip", "incoming/plain-drop"]
    results = [ingest(key, settings) for key in ready]
    assert [(r.drop_id, r.site) for r in results] == [("clinic-a-night-1", "clinic-a"), ("clinic-a-night-2", "clinic-a"),
                                                       ("plain-drop", "plain-drop")]
    with pytest.raises(SiteConflict, match="site_conflict"):
        ingest("incoming/clinic-a/night-1", settings, drop_id="again", site="clinic-b")
    assert discover_incoming(settings, store) == []  # all complete
