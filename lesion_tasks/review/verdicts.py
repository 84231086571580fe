"""Recording a reviewer's verdict. A verdict is appended to `reviews` (history kept, the latest per image
counts, whichever model version it was given under: `cases.disagrees_with_verdict`). Which verdicts become
training labels is `trainset.py`'s policy; `images.label` is never changed here."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from lesion_tasks.core.db import insert_ignore
from lesion_tasks.core.schema import LABELS, VERDICTS, predictions, reviews
from lesion_tasks.review.cases import CONTROL, one_of

MAX_NOTE = 2000


def _clean_note(note: str | None) -> str | None:
    if note is None:
        return None
    note = CONTROL.sub("", note).strip()
    if len(note) > MAX_NOTE:
        raise ValueError(f"note of {len(note)} characters: expected at most {MAX_NOTE}")
    return note or None


def verdict_label(verdict: str, predicted_label: str, label: str | None) -> str:
    """The label a verdict stands for: agree = the prediction, disagree = the other class,
    set_label = the reviewer's choice."""
    one_of("verdict", verdict, VERDICTS)
    if verdict == "agree":
        return predicted_label
    if verdict == "disagree":
        return "NV" if predicted_label == "MEL" else "MEL"
    one_of("label", label, LABELS)
    return label


def record(engine: sa.Engine, image_id: str, model_version: str, verdict: str, reviewer: str, label: str | None = None,
           note: str | None = None, submission_id: str | None = None) -> dict[str, Any]:
    """Append a verdict on `model_version`'s prediction of `image_id`. Idempotent per `submission_id`
    (a form submitted twice records one verdict)."""
    reviewer = CONTROL.sub("", reviewer or "").strip()
    if not reviewer:
        raise ValueError("reviewer: expected the name of the logged-in user, got nothing")
    submission_id = submission_id or uuid.uuid4().hex
    if not re.fullmatch(r"[0-9A-Za-z_-]{8,64}", submission_id):
        raise ValueError(f"submission_id={submission_id[:80]!r}: expected 8-64 letters, digits, '-' or '_'")
    with engine.begin() as conn:
        prediction = conn.execute(sa.select(predictions.c.p_mel, predictions.c.predicted_label, predictions.c.p_other)
                                  .where(predictions.c.image_id == image_id)
                                  .where(predictions.c.model_version == model_version)).first()
        if prediction is None:
            raise LookupError(f"image {image_id!r} has no prediction from model {model_version!r}: nothing to review")
        row = {"submission_id": submission_id, "image_id": image_id, "model_version": model_version,
               "verdict": verdict, "label": verdict_label(verdict, prediction.predicted_label, label),
               "note": _clean_note(note), "reviewer": reviewer[:256], "reviewed_at": datetime.now(UTC),
               "p_mel": prediction.p_mel, "predicted_label": prediction.predicted_label, "p_other": prediction.p_other}
        insert_ignore(conn, reviews, [row], ["submission_id"])
        stored = conn.execute(sa.select(reviews).where(reviews.c.submission_id == submission_id)).mappings().one()
    return dict(stored)
