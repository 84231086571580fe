"""ISIC labels and metadata: read CSV rows and JSON sidecars into per-image evidence, map diagnoses
to MEL / NV / OTHER, validate clinical fields with the `isic-metadata` schema, and merge the evidence
of one image, flagging conflicts.

Diagnoses come in three vocabularies, all real ISIC conventions:
- hierarchical (`diagnosis_1..5`, joined with ':'), the ISIC Archive since 2024;
- legacy flat strings (`melanoma`, `nevus`, ...), older archive records and JSON sidecars;
- challenge class codes (`MEL`, `NV`, `BCC`, ...), ground-truth CSVs.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from isic_metadata.fields import DiagnosisEnum, LegacyDxEnum
from isic_metadata.metadata import MetadataRow
from pydantic import ValidationError

from lesion_tasks.core.reasons import Reason

MEL_PREFIX = "Malignant:Malignant melanocytic proliferations (Melanoma)"
NV_PREFIX = "Benign:Benign melanocytic proliferations:Nevus"
LEGACY_MEL = {"melanoma", "melanoma metastasis"}
LEGACY_NV = {"nevus"}
# One-hot ground-truth columns of the ISIC 2018/2019 challenges. UNK means "no label".
CLASS_CODES = ("MEL", "NV", "BCC", "AK", "AKIEC", "BKL", "DF", "VASC", "SCC", "UNK")
ID_COLUMNS = ("isic_id", "image", "image_id", "image_name")
_EMPTY = {"", "nan", "none", "null", "na", "n/a"}
_UNKNOWN_DX = {"unknown", "unk", "indeterminate"}
_FIELD_ALIASES = {"age_approx": "age", "anatom_site_general_challenge": "anatom_site_general"}


@dataclass(frozen=True)
class Evidence:
    """What one source (a CSV row or a sidecar) says about one image."""

    image_id: str
    source: str
    label: str | None = None
    diagnosis: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    lesion_id: str | None = None
    patient_id: str | None = None
    near_dup_label: str | None = None
    problem: tuple[Reason, str] | None = None
    labelled: bool = False  # this source states a class (possibly "unknown")


@dataclass(frozen=True)
class Merged:
    """The label and metadata of one image after merging all its evidence."""

    label: str | None
    diagnosis: str | None
    label_source: str | None
    metadata: dict[str, Any]
    lesion_id: str | None
    patient_id: str | None
    near_dup_label: str | None
    problem: tuple[Reason, str] | None
    sources: tuple[str, ...]


def _blank(value: Any) -> bool:
    return value is None or str(value).strip().lower() in _EMPTY


def label_from_diagnosis(value: str) -> tuple[str | None, str | None]:
    """(label, canonical diagnosis) for a diagnosis in any ISIC vocabulary; ValueError if unknown.

    MEL = any melanoma (hierarchical: under 'Malignant melanocytic proliferations (Melanoma)');
    NV = melanocytic nevus; everything else OTHER; 'unknown' or blank = unlabelled (None).
    """
    text = str(value).strip()
    if _blank(text) or text.lower() in _UNKNOWN_DX:
        return None, None
    if text.upper() in CLASS_CODES:
        code = text.upper()
        if code == "UNK":
            return None, None
        return {"MEL": "MEL", "NV": "NV"}.get(code, "OTHER"), code
    legacy = {m.value.lower(): m.value for m in LegacyDxEnum}
    if text in legacy.values():
        return _legacy_label(text), text
    try:
        member = DiagnosisEnum(DiagnosisEnum.accept_terminal_values(text))
    except ValueError:
        if text.lower() in legacy:
            canonical = legacy[text.lower()]
            return _legacy_label(canonical), canonical
        raise ValueError(f"diagnosis {text!r}: not an ISIC diagnosis (hierarchical, legacy or class code)") from None
    full = member.value
    if full.startswith(MEL_PREFIX):
        return "MEL", full
    if full.startswith(NV_PREFIX):
        return "NV", full
    return "OTHER", full


# challenge code of an out-of-scope diagnosis in any vocabulary (lower-case keywords, first match wins)
_CODE_KEYWORDS = (("basal cell carcinoma", "BCC"), ("squamous cell carcinoma", "SCC"), ("actinic keratosis", "AK"),
                  ("bowen", "SCC"), ("seborrheic keratosis", "BKL"), ("solar lentigo", "BKL"), ("lentigo", "BKL"),
                  ("lichen", "BKL"), ("benign keratosis", "BKL"), ("dermatofibroma", "DF"), ("hemangioma", "VASC"),
                  ("angioma", "VASC"), ("angiokeratoma", "VASC"), ("pyogenic granuloma", "VASC"), ("vascular", "VASC"))


def challenge_code(diagnosis: str | None) -> str:
    """The ISIC 2019 challenge code (BCC, SCC, AK, BKL, DF, VASC, ...) of a diagnosis, "OTHER" when none fits."""
    if not diagnosis:
        return "OTHER"
    if diagnosis.upper() in CLASS_CODES:
        return "AK" if diagnosis.upper() == "AKIEC" else diagnosis.upper()
    lower = diagnosis.lower()
    return next((code for word, code in _CODE_KEYWORDS if word in lower), "OTHER")


def _legacy_label(canonical: str) -> str:
    lower = canonical.lower()
    return "MEL" if lower in LEGACY_MEL else "NV" if lower in LEGACY_NV else "OTHER"


def validate_clinical(raw: Mapping[str, Any], diagnosis: str | None = None) -> dict[str, Any]:
    """Clinical fields checked by the ISIC metadata schema; ValueError naming the bad fields."""
    data: dict[str, Any] = {}
    for key, value in raw.items():
        if _blank(value):
            continue
        name = _FIELD_ALIASES.get(key, key)
        if name in MetadataRow.model_fields and name != "diagnosis":
            data[name] = value.strip() if isinstance(value, str) else value
    if diagnosis and ":" in diagnosis:
        data["diagnosis"] = diagnosis
    try:
        row = MetadataRow.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'row'}={err.get('input')!r}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(problems) from None
    return row.model_dump(mode="json", exclude_none=True, exclude={"unstructured"})


def _diagnosis_text(row: Mapping[str, Any]) -> str | None:
    levels = [str(row.get(f"diagnosis_{i}") or "").strip() for i in range(1, 6)]
    if any(levels):
        return ":".join(level for level in levels if level)
    value = row.get("diagnosis")
    return None if _blank(value) else str(value).strip()


MAX_ID_LENGTH = 128
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _hostile(row: Mapping[str, Any]) -> str | None:
    """Why a record cannot be stored as is: control characters anywhere, ids longer than the schema allows."""
    for key, value in row.items():
        if isinstance(value, str) and _CONTROL.search(value):
            return f"{key}: control characters in {value[:40]!r}"
    for key in ("lesion_id", "patient_id"):
        value = row.get(key)
        if isinstance(value, str) and len(value.strip()) > MAX_ID_LENGTH:
            return f"{key}: {len(value)} characters, at most {MAX_ID_LENGTH}"
    return None


def _evidence_from_fields(image_id: str, source: str, row: Mapping[str, Any], labelled: bool, label=None,
                          code: str | None = None) -> Evidence:
    """Evidence from a flat record of ISIC fields; `label` (and the class `code`, e.g. BCC) given when a
    one-hot column decided it."""
    diagnosis = None
    problem = None
    hostile = _hostile(row)
    if hostile:
        return Evidence(image_id, source, problem=(Reason.INVALID_METADATA, f"{source}: {hostile}"), labelled=labelled)
    if label is None and labelled:
        text = _diagnosis_text(row)
        try:
            label, diagnosis = label_from_diagnosis(text) if text else (None, None)
        except ValueError as exc:
            problem = (Reason.INVALID_METADATA, f"{source}: {exc}")
    elif label is not None:
        diagnosis = code or label
    metadata: dict[str, Any] = {}
    if problem is None:
        try:
            metadata = validate_clinical(row, diagnosis)
        except ValueError as exc:
            problem = (Reason.INVALID_METADATA, f"{source}: {exc}")
    return Evidence(
        image_id=image_id,
        source=source,
        label=label,
        diagnosis=diagnosis,
        metadata=metadata,
        lesion_id=None if _blank(row.get("lesion_id")) else str(row["lesion_id"]).strip(),
        patient_id=None if _blank(row.get("patient_id")) else str(row["patient_id"]).strip(),
        near_dup_label=None if _blank(row.get("near_dup_group")) else str(row["near_dup_group"]).strip(),
        problem=problem,
        labelled=labelled,
    )


def _one_hot(image_id: str, source: str, row: Mapping[str, Any], classes: list[str]) -> Evidence:
    values: dict[str, float] = {}
    for cls in classes:
        raw = str(row.get(cls) or "").strip()
        try:
            values[cls] = float(raw)
        except ValueError:
            return Evidence(image_id, source, problem=(Reason.INVALID_LABEL, f"{source}: {cls}={raw!r}, expected 0 or 1"), labelled=True)
    bad = {c: v for c, v in values.items() if v not in (0.0, 1.0)}
    if bad:
        return Evidence(image_id, source, problem=(Reason.INVALID_LABEL, f"{source}: {bad}, expected one-hot 0/1"), labelled=True)
    hot = [c for c, v in values.items() if v == 1.0]
    if len(hot) > 1:
        return Evidence(image_id, source, problem=(Reason.MULTI_HOT_LABEL, f"{source}: classes {hot} all set"), labelled=True)
    if not hot:
        return Evidence(image_id, source, problem=(Reason.INVALID_LABEL, f"{source}: no class set among {classes}"), labelled=True)
    code = hot[0]
    label = None if code == "UNK" else ("MEL" if code == "MEL" else "NV" if code == "NV" else "OTHER")
    return _evidence_from_fields(image_id, source, row, labelled=True, label=label, code=code)


def _isic2017(image_id: str, source: str, row: Mapping[str, Any]) -> Evidence:
    """ISIC 2017 ground truth: `melanoma`, `seborrheic_keratosis` flags; neither means nevus."""
    try:
        mel, sk = (float(str(row.get(c) or "").strip()) for c in ("melanoma", "seborrheic_keratosis"))
    except ValueError:
        return Evidence(image_id, source, problem=(Reason.INVALID_LABEL, f"{source}: melanoma/seborrheic_keratosis not numeric"), labelled=True)
    if mel not in (0.0, 1.0) or sk not in (0.0, 1.0):
        return Evidence(image_id, source, problem=(Reason.INVALID_LABEL, f"{source}: expected 0/1 flags"), labelled=True)
    if mel and sk:
        return Evidence(image_id, source, problem=(Reason.MULTI_HOT_LABEL, f"{source}: melanoma and seborrheic_keratosis both set"), labelled=True)
    label = "MEL" if mel else "OTHER" if sk else "NV"
    # seborrhoeic keratosis is one of the benign keratosis-like lesions (BKL) of the 2018/2019 codes
    return _evidence_from_fields(image_id, source, row, labelled=True, label=label, code="BKL" if sk else label)


def read_csv(source: str, data: bytes) -> tuple[str | None, list[Evidence]]:
    """(kind, evidence) for one CSV. kind is None when the CSV is not an ISIC label/metadata file.

    Raises ValueError when the bytes are not a readable CSV.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return _read_csv_text(source, text)
    except csv.Error as exc:  # e.g. NUL bytes, runaway quoted fields
        raise ValueError(f"{source}: not a readable CSV ({exc})") from None


def _read_csv_text(source: str, text: str) -> tuple[str | None, list[Evidence]]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    id_col = next((c for c in ID_COLUMNS if c in columns), None)
    if id_col is None:
        return None, []
    reader.fieldnames = columns
    classes = [c for c in CLASS_CODES if c in columns]
    has_dx = "diagnosis" in columns or "diagnosis_1" in columns
    if len(classes) >= 2:
        kind = "challenge-ground-truth"
    elif {"melanoma", "seborrheic_keratosis"} <= set(columns):
        kind = "isic2017-ground-truth"
    elif id_col == "isic_id":
        kind = "isic-cli-metadata"
    elif has_dx:
        kind = "diagnosis-csv"
    else:
        kind = "challenge-metadata"
    out: list[Evidence] = []
    for row in reader:
        image_id = str(row.get(id_col) or "").strip()
        if not image_id:
            continue
        if kind == "challenge-ground-truth":
            out.append(_one_hot(image_id, source, row, classes))
        elif kind == "isic2017-ground-truth":
            out.append(_isic2017(image_id, source, row))
        else:
            out.append(_evidence_from_fields(image_id, source, row, labelled=has_dx))
    return kind, out


def read_sidecar(source: str, data: bytes, fallback_id: str) -> Evidence:
    """Evidence from an ISIC Archive JSON record (legacy `meta.clinical` or current `metadata.clinical`)."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Evidence(fallback_id, source, problem=(Reason.INVALID_SIDECAR, f"{source}: not JSON ({exc})"))
    if not isinstance(record, dict):
        return Evidence(fallback_id, source, problem=(Reason.INVALID_SIDECAR, f"{source}: expected a JSON object"))
    section = record.get("meta") if isinstance(record.get("meta"), dict) else record.get("metadata")
    clinical = section.get("clinical") if isinstance(section, dict) else None
    if not isinstance(clinical, dict):
        return Evidence(fallback_id, source, problem=(Reason.INVALID_SIDECAR, f"{source}: no meta.clinical object"))
    image_id = fallback_id  # a sidecar belongs to the image file of the same name
    fields = dict(clinical)
    acquisition = section.get("acquisition") if isinstance(section.get("acquisition"), dict) else {}
    if acquisition.get("image_type"):
        fields.setdefault("image_type", acquisition["image_type"])
    return _evidence_from_fields(image_id, source, fields, labelled=True)


def merge(image_id: str, evidence: Iterable[Evidence]) -> Merged:
    """Combine every source's statement about one image; the first problem or a label conflict wins."""
    items = list(evidence)
    sources = tuple(e.source for e in items)
    problem = next((e.problem for e in items if e.problem), None)
    labels = {e.label for e in items if e.label is not None}
    if problem is None and len(labels) > 1:
        said = ", ".join(f"{e.source}={e.label}" for e in items if e.label is not None)
        problem = (Reason.CONFLICTING_LABEL, f"{image_id}: sources disagree ({said})")
    label = next(iter(labels)) if len(labels) == 1 else None
    # the most specific diagnosis (hierarchical > legacy > class code) from a source that agrees
    diagnoses = [e for e in items if e.diagnosis and e.label == label]
    best = max(diagnoses, key=lambda e: (":" in e.diagnosis, e.diagnosis.upper() not in CLASS_CODES), default=None)
    metadata: dict[str, Any] = {}
    for e in items:
        for key, value in e.metadata.items():
            metadata.setdefault(key, value)
    return Merged(
        label=label,
        diagnosis=best.diagnosis if best else None,
        label_source=",".join(dict.fromkeys(e.source for e in items if e.label is not None)) or None,
        metadata=metadata,
        lesion_id=next((e.lesion_id for e in items if e.lesion_id), None),
        patient_id=next((e.patient_id for e in items if e.patient_id), None),
        near_dup_label=next((e.near_dup_label for e in items if e.near_dup_label), None),
        problem=problem,
        sources=sources,
    )
