"""`v_review_queue` gains `queue_rank` as its last column: the review UI's default order (`cases.priority_order`),
1 = first, over the champion's open cases (NULL once a case has a verdict), so `ORDER BY queue_rank` in SQL lists
the queue people see: unlabelled images first (ranks 1..n are the UI's default page), then ISIC-labelled ones;
within each, likely melanomas (p_mel >= 0.5) by p_mel, then the decisions flagged `uncertain` by
decision_uncertainty (ties nearest the threshold), then the rest by p_mel; image_id breaks ties. ROW_NUMBER()
needs SQLite >= 3.25 (PostgreSQL: any). Every other column keeps its name and place; only `v_review_queue` is
dropped and created, and `lesion_reader` gets SELECT on it again. The view SQL is a frozen copy of 0014's.

Revision ID: 0018_queue_rank
Revises: 0017_label_import_runs
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0018_queue_rank"
down_revision = "0017_label_import_runs"
branch_labels = None
depends_on = None

ROLE = "lesion_reader"
COLUMNS = ("v.image_id, v.model_version, v.p_mel, v.predicted_label, v.threshold, v.entropy, v.mutual_info, v.mc_samples, "
           "v.gradcam_uri, v.needs_review, v.review_reasons, v.drop_id, v.run_id, v.scored_at, "
           "i.label AS known_label, i.lesion_id, i.patient_id, i.normalized_uri, i.original_uri, "
           "r.verdict AS review_verdict, r.label AS review_label, r.reviewer, r.reviewed_at, "
           "v.p_other, v.site, v.site_status, v.decision_uncertainty, v.attention_on_lesion")
QUEUE_FROM = """FROM v_latest_predictions v JOIN images i ON i.image_id = v.image_id
        LEFT JOIN reviews r ON r.id = (SELECT max(id) FROM reviews x
                                       WHERE x.image_id = v.image_id AND x.model_version = v.model_version)
        WHERE v.needs_review"""
LIKELY = "v.p_mel >= 0.5"
UNSURE = "v.review_reasons LIKE '%uncertain%'"
ORDER = (f"CASE WHEN i.label IS NULL THEN 0 ELSE 1 END, CASE WHEN {LIKELY} THEN 1 WHEN {UNSURE} THEN 2 ELSE 3 END, "
         f"CASE WHEN {LIKELY} THEN v.p_mel WHEN {UNSURE} THEN COALESCE(v.decision_uncertainty, -1.0) ELSE v.p_mel END DESC, "
         "ABS(v.p_mel - v.threshold), v.image_id")
RANK = (f"CASE WHEN r.id IS NULL THEN ROW_NUMBER() OVER (PARTITION BY CASE WHEN r.id IS NULL THEN 0 ELSE 1 END "
        f"ORDER BY {ORDER}) END AS queue_rank")


def _recreate(with_rank: bool) -> None:
    op.execute("DROP VIEW v_review_queue")
    op.execute(f"CREATE VIEW v_review_queue AS SELECT {COLUMNS}{', ' + RANK if with_rank else ''} {QUEUE_FROM}")
    bind = op.get_bind()
    if bind.dialect.name == "postgresql" and bind.execute(
            sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE}).scalar():
        op.execute(f"GRANT SELECT ON v_review_queue TO {ROLE}")


def upgrade() -> None:
    _recreate(with_rank=True)


def downgrade() -> None:
    _recreate(with_rank=False)
