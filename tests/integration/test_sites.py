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
from lesion_tasks.core.schema import images, label_imports, site_evaluations, site_samples, splits
from lesion_tasks.ingest import label_import
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.sites import status as sites
from lesion_tasks.versions import registry
from lesion_tasks.ops.synthetic import make_drop
from tests.helpers import LABELLED_DROP, NIGHT_DROP

pytestmark = pytest.mark.unit
CLINIC = "clinic-x"


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
    # probabilities now those of a sample of 200 (of the clinic's 400): twice as large for the same stratum, or
    # more where the top quintile's reached 1 and the rest's were raised to keep the sample's size
    pi = {r["image_id"]: r["inclusion_probability"] for r in bigger["images"]}
    before = {r["image_id"]: r["inclusion_probability"] for r in first["images"]}
    assert all(pi[i] == 1.0 or pi[i] >= 2 * before[i] * (1 - 1e-9) for i in ids)
    assert sum(1 / p for p in pi.values()) == pytest.approx(400, rel=0.25)  # the clinic's size, from one measure
    with pytest.raises(ValueError, match="no images; known sites"):
        cli.sample_site(settings, "nowhere", 10)


def test_an_unlabelled_clinic_is_decided_at_its_own_operating_point(clinic):
    """Drawing the sample scored the clinic's 400 images (`lesion score --site`); the run ended by estimating its
    operating point from their calibrated p_mel and deciding them at it: `lesion sites --json` says how
    (`unlabelled`, on 400 images, with an interval), every prediction carries that threshold, and a rerun of the
    settling changes nothing."""
    from lesion_tasks.core.schema import predictions
    from lesion_tasks.scoring import nightly
    from lesion_tasks.sites import operating

    settings, truth, _ = clinic
    cli.sample_site(settings, CLINIC, 100)  # scores the clinic first (a no-op if an earlier test did)
    listed = {s["site"]: s for s in sites.overview(settings)["sites"]}
    op = listed[CLINIC]["operating_point"]
    assert op["method"] == "unlabelled" and op["images"] == 400 and op["labelled"] == 0, op
    assert listed[CLINIC]["threshold"]["value"] == op["threshold"] and listed[CLINIC]["status"] == "unvalidated"
    sens = op["sensitivity"]
    assert sens["low"] <= sens["estimate"] <= sens["high"] and sens["estimate"] >= 0.85 + operating.MARGIN - 1e-3, op
    assert op["labels_to_next_status"] > 0 and "unlabelled" not in listed[LABELLED_DROP]["operating_point"]["method"]
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(predictions.c.image_id, predictions.c.p_mel, predictions.c.threshold, predictions.c.predicted_label,
                                      predictions.c.review_reasons)
                            .join(images, images.c.image_id == predictions.c.image_id).where(images.c.site == CLINIC)).all()
        v = registry.version(conn, None)
    engine.dispose()
    assert len(rows) == 400 and {round(r.threshold, 9) for r in rows} == {round(op["threshold"], 9)}
    assert all((r.p_mel >= r.threshold) == (r.predicted_label == "MEL") for r in rows)
    # the band follows the threshold: no NV call far from it (in odds) is flagged near it
    near = [r for r in rows if r.review_reasons and "near_threshold" in r.review_reasons]
    assert all(v.review_rule.near_threshold(r.p_mel, r.threshold) for r in near)
    assert v.review_rule.near_threshold_logit is not None and v.review_rule.out_of_scope_by_threshold
    again = nightly.settle(settings, "champion", None)
    assert again["updated"] == 0 and again["rescored"] == 0, again
    assert again["sites"][CLINIC]["threshold"] == op["threshold"]
    print(json.dumps({"operating_point": op, "realised_sensitivity": float(np.mean(
        [r.p_mel >= r.threshold for r in rows if truth.get(r.image_id) == "MEL"] or [np.nan]))}, default=str))


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


def test_the_clinics_labels_correct_its_operating_point(clinic):
    """Once its sample's labels arrive (the previous test imported 200), the next settling re-estimates the clinic's
    operating point from them, no retrain needed: the champion never trained on them, so its stored scores are out
    of sample. `method: "labelled"`, the labels' correction and their own IPW check beside it, the threshold where
    the stated lower bound of sensitivity meets the target, every case decided at it, and a rerun changes nothing."""
    from lesion_tasks.core.schema import predictions
    from lesion_tasks.scoring import nightly

    settings, truth, _ = clinic
    settled = nightly.settle(settings, "champion", None)
    listed = {s["site"]: s for s in sites.overview(settings)["sites"]}[CLINIC]
    op = listed["operating_point"]
    # its status now rests on its labels, every one of them, counted in effective melanomas
    assert listed["evidence"] == "labels" and listed["melanomas_evidence"] == int(op["melanomas"]), listed
    assert listed["metrics"]["evidence"] == "labels" and listed["status"] != "unvalidated", listed
    assert op == {**settled["sites"][CLINIC], "labels_to_next_status": op["labels_to_next_status"]}
    assert op["method"] == "labelled" and op["labelled"] == 200 and op["images"] == 400, op
    labels = op["labels"]
    assert labels["melanomas"] == len(_sample_ids(settings)) and labels["scores"] == (
        "scored by a model that never trained on them"), labels
    assert 0 < labels["effective_melanomas"] <= labels["melanomas"] and len(labels["correction"]) == 3
    ipw = labels["ipw"]
    assert ipw["sensitivity_ci95"][0] <= ipw["sensitivity"] <= ipw["sensitivity_ci95"][1], ipw
    sens = op["sensitivity"]
    assert sens["low"] >= 0.85 - 1e-3 and sens["low"] <= sens["estimate"] <= sens["high"], op
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(predictions.c.image_id, predictions.c.p_mel, predictions.c.threshold,
                                      predictions.c.predicted_label)
                            .join(images, images.c.image_id == predictions.c.image_id).where(images.c.site == CLINIC)).all()
    engine.dispose()
    assert len(rows) == 400 and {round(r.threshold, 9) for r in rows} == {round(op["threshold"], 9)}
    assert all((r.p_mel >= r.threshold) == (r.predicted_label == "MEL") for r in rows)
    evaluated = sa.select(site_evaluations.c.status, site_evaluations.c.evidence, site_evaluations.c.evaluated_at).where(
        site_evaluations.c.site == CLINIC)
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        before = conn.execute(evaluated).all()
    again = nightly.settle(settings, "champion", None)
    with engine.connect() as conn:
        assert conn.execute(evaluated).all() == before and before[0][:2] == (listed["status"], "labels"), before
    engine.dispose()
    assert again["updated"] == 0 and again["rescored"] == 0 and again["sites"][CLINIC] == settled["sites"][CLINIC]
    print(json.dumps({"operating_point": op, "realised_sensitivity": float(np.mean(
        [r.predicted_label == "MEL" for r in rows if truth.get(r.image_id) == "MEL"]))}, default=str))


def _sample_ids(settings) -> list[str]:
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        ids = list(conn.scalars(sa.select(site_samples.c.image_id).join(images, images.c.image_id == site_samples.c.image_id)
                                .where(site_samples.c.site == CLINIC, images.c.label == "MEL")))
    engine.dispose()
    return ids


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
    assert len(own["out_of_fold"]["ids"]) == len(own["out_of_fold"]["p"]) == own["validation"]["n"], own
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
        # decided at its labelled operating point: the retrained version's labels are scored by their out-of-fold
        # scores (it trained on them), those of its test split by its own; its status now rests on all of them
        after = {s["site"]: s for s in sites.overview(settings)["sites"]}[CLINIC]
        op = after["operating_point"]
        assert op["method"] == "labelled" and "cross-fitted at retraining" in op["labels"]["scores"], op
        assert after["evidence"] == "labels" and after["melanomas_evidence"] == int(op["melanomas"]), after
        assert after["melanomas_evidence"] > clinic_row["melanomas_evidence"]  # every label counts, not the test split's
        assert night["images_by_status"][after["status"]] >= 400, night
        assert (night["failing_sites"] == [CLINIC]) == (after["status"] == "failing"), (night, after)
        engine = db.make_engine(settings.db_url)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT site, site_status, threshold FROM v_latest_predictions WHERE site = :s"),
                                {"s": CLINIC}).all()
        engine.dispose()
        assert len(rows) == 400 and {r.site_status for r in rows} == {after["status"]}
        assert {round(r.threshold, 9) for r in rows} == {round(op["threshold"], 9)}
        print(json.dumps({"after_the_night": after}, default=str))
    print(json.dumps({"site": clinic_row, "threshold": own}, default=str))
