"""ISIC label and metadata parsing, on 3-row fixtures of each real layout."""

from __future__ import annotations

import json

import pytest

from lesion_tasks.ingest.labels import label_from_diagnosis, merge, read_csv, read_sidecar
from lesion_tasks.core.reasons import Reason


@pytest.mark.parametrize("text,label", [
    ("melanoma", "MEL"), ("nevus", "NV"), ("seborrheic keratosis", "OTHER"), ("MEL", "MEL"), ("BKL", "OTHER"),
    ("UNK", None), ("unknown", None), ("", None),
    ("Malignant:Malignant melanocytic proliferations (Melanoma):Melanoma in situ", "MEL"),
    ("Benign:Benign melanocytic proliferations:Nevus:Nevus, Spitz", "NV"),
    ("Malignant:Malignant adnexal epithelial proliferations - Follicular:Basal cell carcinoma", "OTHER"),
    ("Melanoma Invasive", "MEL"),
])
def test_label_from_diagnosis(text, label):
    assert label_from_diagnosis(text)[0] == label


def test_unknown_diagnosis_is_an_error_naming_the_value():
    with pytest.raises(ValueError, match="'lizard bite'"):
        label_from_diagnosis("lizard bite")


def test_isic_cli_metadata_hierarchical():
    data = (b"isic_id,attribution,copyright_license,age_approx,sex,anatom_site_general,diagnosis_1,diagnosis_2,diagnosis_3,lesion_id\n"
            b"ISIC_1,A,CC-0,45,female,anterior torso,Malignant,Malignant melanocytic proliferations (Melanoma),Melanoma Invasive,IL_1\n"
            b"ISIC_2,A,CC-0,30,male,lower extremity,Benign,Benign melanocytic proliferations,Nevus,IL_2\n"
            b"ISIC_3,A,CC-0,,,,,,,\n")
    kind, rows = read_csv("metadata.csv", data)
    assert kind == "isic-cli-metadata"
    assert [(r.image_id, r.label, r.lesion_id) for r in rows] == [("ISIC_1", "MEL", "IL_1"), ("ISIC_2", "NV", "IL_2"), ("ISIC_3", None, None)]
    assert rows[0].metadata["age"] == 45 and rows[0].metadata["sex"] == "female"


def test_challenge_one_hot_and_2017_layouts():
    kind, rows = read_csv("gt.csv", b"image,MEL,NV,BCC,UNK\nA,1.0,0.0,0.0,0.0\nB,0,0,1,0\nC,0,0,0,1\n")
    assert kind == "challenge-ground-truth" and [r.label for r in rows] == ["MEL", "OTHER", None]
    kind, rows = read_csv("gt17.csv", b"image_id,melanoma,seborrheic_keratosis\nA,1,0\nB,0,0\nC,0,1\n")
    assert kind == "isic2017-ground-truth" and [r.label for r in rows] == ["MEL", "NV", "OTHER"]


def test_csv_that_is_not_isic_is_recognised_as_such():
    assert read_csv("notes.csv", b"when,who\n1,2\n") == (None, [])
    with pytest.raises(ValueError, match="not UTF-8"):
        read_csv("bin.csv", b"\xff\xfe\x00garbage")


def test_sidecar_legacy_and_current_formats():
    legacy = {"name": "ISIC_5", "meta": {"clinical": {"diagnosis": "melanoma", "age_approx": 60, "sex": "male"},
                                          "acquisition": {"image_type": "dermoscopic"}}}
    ev = read_sidecar("ISIC_5.json", json.dumps(legacy).encode(), "ISIC_5")
    assert (ev.image_id, ev.label, ev.problem) == ("ISIC_5", "MEL", None)
    assert ev.metadata["image_type"] == "dermoscopic"
    current = {"isic_id": "ISIC_6", "metadata": {"clinical": {"diagnosis_1": "Benign", "diagnosis_2": "Benign melanocytic proliferations", "diagnosis_3": "Nevus"}}}
    assert read_sidecar("ISIC_6.json", json.dumps(current).encode(), "ISIC_6").label == "NV"
    assert read_sidecar("x.json", b"[1]", "x").problem[0] == Reason.INVALID_SIDECAR


def test_merge_conflicts_and_agreement():
    _, a = read_csv("a.csv", b"image,diagnosis\nX,melanoma\nY,nevus\n")
    _, b = read_csv("b.csv", b"image,MEL,NV\nX,1,0\nY,1,0\n")
    x = merge("X", [a[0], b[0]])
    assert (x.label, x.problem, x.label_source) == ("MEL", None, "a.csv,b.csv")
    assert x.diagnosis == "melanoma"  # the more specific statement wins over the class code
    y = merge("Y", [a[1], b[1]])
    assert y.problem[0] == Reason.CONFLICTING_LABEL and "a.csv=NV" in y.problem[1]
