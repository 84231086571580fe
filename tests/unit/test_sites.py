"""The pure parts of test_sites.py (no trained home, no training): see tests/integration/test_sites.py for the rest."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import sqlalchemy as sa

from lesion_tasks.core import db
from lesion_tasks.ingest import label_import
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.ingest.sources import SiteConflict, _is_site_folder, layout_site, resolve_site
from lesion_tasks.model import evaluation


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

def test_site_rates_get_exact_intervals_at_every_count():
    """Five test melanomas, all found: sensitivity 1.0 with its exact 95% interval [0.478, 1.0] (Clopper-Pearson),
    not a bootstrap's collapsed [1.0, 1.0]; weighted evidence counts by its effective size; AUC keeps its bootstrap
    interval only where the site has enough melanomas, and `ci95_method` says which is which."""
    assert evaluation.clopper_pearson(5, 5) == [pytest.approx(0.4782, abs=1e-4), 1.0]
    assert evaluation.clopper_pearson(0, 10) == [0.0, pytest.approx(0.3085, abs=1e-4)]
    assert evaluation.clopper_pearson(0, 0) is None
    y = np.array([1] * 5 + [0] * 20)
    p = np.r_[np.full(5, 0.9), np.linspace(0.0, 0.5, 20)]
    part = evaluation.by_group(y, p, np.array(["clinic"] * 25, dtype=object), 0.3, bootstrap=200, min_mel_for_ci=30)["clinic"]
    assert part["mel_sensitivity"] == 1.0 and part["ci95"]["mel_sensitivity"] == [pytest.approx(0.4782, abs=1e-4), 1.0]
    lo, hi = part["ci95"]["mel_specificity"]
    assert lo < part["mel_specificity"] < hi and "auc" not in part["ci95"]
    assert part["ci95_method"] == {"mel_sensitivity": "clopper-pearson", "mel_specificity": "clopper-pearson"}
    # weights: the interval of the weighted rate on Kish's effective count (here 2 effective melanomas of 5)
    w = np.r_[[10.0, 10.0, 0.1, 0.1, 0.1], np.ones(20)]
    weighted = evaluation.by_group(y, p, np.array(["clinic"] * 25, dtype=object), 0.3, 200, w=w)["clinic"]
    n_eff = evaluation.effective_size(w[:5])
    assert weighted["ci95"]["mel_sensitivity"] == pytest.approx(evaluation.clopper_pearson(n_eff, n_eff))
    assert weighted["ci95"]["mel_sensitivity"][0] < part["ci95"]["mel_sensitivity"][0]
    big = np.r_[np.ones(40), np.zeros(40)].astype(int)
    scored = np.r_[np.linspace(0.3, 1, 40), np.linspace(0, 0.7, 40)]
    both = evaluation.by_group(big, scored, np.array(["s"] * 80, dtype=object), 0.5, bootstrap=200)["s"]
    assert both["ci95_method"]["auc"] == "bootstrap" and both["ci95_method"]["mel_sensitivity"] == "clopper-pearson"


def test_imported_diagnoses():
    assert label_import.parse_diagnosis("MEL") == ("MEL", "MEL")
    assert label_import.parse_diagnosis("unk") == ("OTHER", "UNK")
    assert label_import.parse_diagnosis("BCC") == ("OTHER", "BCC")
    assert label_import.parse_diagnosis("nevus")[0] == "NV"
    for bad in ("", "XYZ", "unknown"):
        with pytest.raises(ValueError):
            label_import.parse_diagnosis(bad)

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
    shares = night_sites({"new": {"status": "unvalidated", "images": 40, "out_of_scope": 3, "out_of_scope_share": 0.075}})
    assert shares["out_of_scope_share_by_site"] == {"new": 0.075}

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


def test_before_any_champion_every_site_says_so(tmp_path):
    """No model yet: a labelled site is `provisional` and an unlabelled one `unvalidated`, and what both still need
    is a champion, not a retrain of a champion that does not exist."""
    from lesion_tasks.core.settings import Settings
    from lesion_tasks.ops.synthetic import make_drop
    from lesion_tasks.sites import status

    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")})
    db.upgrade(settings)
    ingest(str(make_drop(tmp_path / "labelled", n_images=12, melanoma_fraction=0.25, seed=3)), settings)
    unlabelled = make_drop(tmp_path / "clinic", n_images=8, melanoma_fraction=0.25, seed=4)
    (unlabelled / "metadata.csv").unlink()
    ingest(str(unlabelled), settings, site="clinic")
    listed = {s["site"]: s for s in status.overview(settings)["sites"]}
    assert status.overview(settings)["champion"] is None and listed["clinic"]["status"] == "unvalidated"
    assert {s["status"] for name, s in listed.items() if name != "clinic"} == {"provisional"}, listed
    assert all(s["needed"].startswith("a champion: none is trained yet") and s["threshold"]["value"] is None
               and s["operating_point"] is None for s in listed.values()), listed


# --- site names: normalised, never merged, never split (probe finding 3) ------------------------

MERGED_BEFORE = [("東京 Hospital", "大阪 Hospital"), ("A" * 128 + "x" * 172, "A" * 128 + "y" * 172), ("../x", "x"),
                 ("Сlinic", "linic"), ("Сlinic", "Clinic")]  # the first 'С' of the last two is Cyrillic


def test_different_site_names_never_become_one_site():
    for a, b in MERGED_BEFORE:
        ka, kb = resolve_site(a, None, None, "d"), resolve_site(None, b, None, "d")
        assert ka.lower() != kb.lower() and 0 < len(ka) <= 128 and 0 < len(kb) <= 128, (a, b, ka, kb)
        assert resolve_site(ka, None, None, "d") == ka  # a site named by its stored form is that site
        assert resolve_site(None, None, a, "d") == ka  # whatever path the name arrives by
        with pytest.raises(SiteConflict, match="site_conflict"):
            resolve_site(a, b, None, "d")
    # names that differ only by Unicode composition, case or whitespace are one site (no conflict either)
    nfc, nfd = "Clinique M\u00e9dicale", "Clinique Me\u0301dicale"
    assert resolve_site(nfc, nfd, None, "d") == resolve_site(nfd, None, None, "d") == resolve_site(None, None, nfc, "d")
    assert resolve_site("ClinicX", "clinicx", "CLINICX", "d") == "ClinicX"
    assert resolve_site(None, "clinicx", None, "d").lower() == resolve_site("ClinicX", None, None, "d").lower()
    assert resolve_site(nfc.upper(), None, None, "d") == resolve_site(nfc, None, None, "d")
    # ASCII names keep exactly the site they had before
    for name, before in (("clinic-a", "clinic-a"), ("Clinic A", "Clinic-A"), ("Clinic  A\n", "Clinic-A"),
                         ("ISIC_2019.v2", "ISIC_2019.v2"), ("x" * 128, "x" * 128)):
        assert resolve_site(name, None, None, "d") == before
    for blank in ("", "   ", "\t\n"):
        with pytest.raises(ValueError, match=rf"--site {re.escape(repr(blank))}: empty"):
            resolve_site(blank, None, None, "d")


def test_layout_sites_and_drop_ids_never_collide_across_sites_or_nights(tmp_path, monkeypatch, capsys):
    """Two clinics' `drop1` folders, a 146-character site folder's two nights (through discovery and the
    DAG's per-drop call), case and NFC/NFD variants of one clinic, and `lesion sites sample` by another case."""
    from lesion_tasks import cli
    from lesion_tasks.core.schema import images
    from lesion_tasks.core.settings import Settings
    from lesion_tasks.core.store import open_store
    from lesion_tasks.ingest.drop import ingest_one_of_many
    from lesion_tasks.ingest.sources import discover_incoming
    from lesion_tasks.sites import sample
    from tests import reliability
    from tests.imagegen import jpeg

    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home"), "LESION_INCOMING_SETTLE_SECONDS": "0"})
    db.upgrade(settings)
    store = open_store(settings)
    long_site = "Clinic-" + "L" * 139  # 146 characters
    store.put("incoming/東京 Hospital/drop1/ISIC_5100001.jpg", jpeg(11))
    store.put("incoming/大阪 Hospital/drop1/ISIC_5100002.jpg", jpeg(12))
    store.put(f"incoming/{long_site}/night-1/ISIC_5100003.jpg", jpeg(13))
    results = [ingest_one_of_many(key, settings) for key in discover_incoming(settings, store)]
    store.put(f"incoming/{long_site}/night-2/ISIC_5100004.jpg", jpeg(14))
    results += [ingest_one_of_many(key, settings) for key in discover_incoming(settings, store)]
    failed = [r for r in results if r.get("failed")]
    by_source = {r["source"]: r for r in results if not r.get("failed")}
    tokyo, osaka = by_source.get("incoming/東京 Hospital/drop1"), by_source.get("incoming/大阪 Hospital/drop1")
    nights = [by_source.get(f"incoming/{long_site}/night-{n}") for n in (1, 2)]
    drop_ids = {r["drop_id"] for r in by_source.values()}
    assert not failed and len(results) == 4 and len(drop_ids) == 4, (failed, drop_ids)
    assert all(len(d) <= 128 for d in drop_ids)
    assert tokyo["site"] != osaka["site"] and nights[0]["site"] == nights[1]["site"]
    # one clinic by three spellings (case, NFC, NFD): one site, the first spelling kept
    for k, (spelled, how) in enumerate((("ClinicX", "--site"), ("clinicx", "--site"), ("CLINICX", "site.txt"),
                                        ("Clinique M\u00e9dicale", "--site"), ("clinique me\u0301dicale", "site.txt"))):
        drop = tmp_path / f"local-{k}"
        drop.mkdir()
        (drop / f"ISIC_52{k:05d}.jpg").write_bytes(jpeg(20 + k))
        if how == "site.txt":
            (drop / "site.txt").write_text(spelled + "\n")
        assert not ingest(str(drop), settings, site=spelled if how == "--site" else None).quarantined
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        sites = sorted(conn.scalars(sa.select(images.c.site).distinct()))
    engine.dispose()
    assert len(sites) == 5 and "ClinicX" in sites and not {"clinicx", "CLINICX"} & set(sites), sites
    assert sample.draw(settings, "clinicx", 2)["site"] == "ClinicX"
    monkeypatch.setenv("LESION_HOME", str(tmp_path / "home"))
    assert cli.main(["sites", "sample", "CLINICX", "--size", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == 3
    for blank in ("", "   "):
        assert cli.main(["ingest", str(tmp_path / "local-0"), "--site", blank, "--json"]) == 2
        assert repr(blank) in json.loads(capsys.readouterr().out)["error"]
    reliability.record("Colliding site names", "incoming/東京 Hospital/drop1 and incoming/大阪 Hospital/drop1; a 146-character "
                       "site folder on two nights; ClinicX / clinicx / CLINICX and NFC / NFD names; --site '' and '   '",
                       "distinct sites and drop ids for distinct names; one site per clinic; blank --site refused",
                       f"{len(results) - len(failed)} of {len(results)} layout drops ingested, {len(drop_ids)} drop ids, "
                       f"{len(sites)} sites for 5 clinics; blank --site exit 2", len(failed), 0)
