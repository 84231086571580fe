"""A promotion keeps the queue, and verdicts belong to the image (issue 37):

- `v_latest_predictions` shows per image the champion's prediction, else (until the champion has scored it) the
  previous champion's (the `previous` of the champion's latest promotion in `champion_history`); the new last
  column `prediction_of` says which ('champion' / 'previous_champion'). A promotion so never empties it.
- `v_review_queue` joins an image's latest verdict whichever model version it was given under (new column
  `review_model_version`), lists the flagged cases and those whose prediction disagrees with a verdict given
  under another version (a melanoma or nevus verdict called the other class, or an OTHER verdict called NV
  without an out_of_scope flag), open again; `queue_rank` (0018's order) ranks the open ones; `prediction_of`
  follows. Every other column keeps its name and place. The view SQL is a frozen copy (0014's, 0018's).

Revision ID: 0019_verdicts_per_image
Revises: 0018_queue_rank
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0019_verdicts_per_image"
down_revision = "0018_queue_rank"
branch_labels = None
depends_on = None

ROLE = "lesion_reader"
PREDICTION_COLUMNS = ("image_id", "model_version", "p_mel", "predicted_label", "threshold", "entropy", "mutual_info",
                      "mc_samples", "gradcam_uri", "needs_review", "review_reasons", "drop_id", "run_id", "scored_at")
P_COLS = ", ".join(f"p.{c}" for c in PREDICTION_COLUMNS)
SITE = "LEFT JOIN v_sites s ON s.site = i.site"
LATEST_0014 = (f"SELECT {P_COLS}, p.p_other, i.site, COALESCE(s.status, 'unvalidated') AS site_status, "
               "p.decision_uncertainty, p.attention_on_lesion FROM predictions p JOIN model_versions m "
               f"ON m.model_version = p.model_version JOIN images i ON i.image_id = p.image_id {SITE} WHERE m.is_champion")
CHAMPION = "(SELECT model_version FROM model_versions WHERE is_champion)"
PREVIOUS = (f"(SELECT h.previous FROM champion_history h WHERE h.model_version = {CHAMPION} "
            "ORDER BY h.at DESC, h.id DESC LIMIT 1)")
LATEST = (f"SELECT {P_COLS}, p.p_other, i.site, COALESCE(s.status, 'unvalidated') AS site_status, "
          "p.decision_uncertainty, p.attention_on_lesion, "
          f"CASE WHEN p.model_version = {CHAMPION} THEN 'champion' ELSE 'previous_champion' END AS prediction_of "
          f"FROM predictions p JOIN images i ON i.image_id = p.image_id {SITE} "
          f"WHERE p.model_version = {CHAMPION} OR (p.model_version = {PREVIOUS} AND NOT EXISTS "
          f"(SELECT 1 FROM predictions c WHERE c.image_id = p.image_id AND c.model_version = {CHAMPION}))")
COLUMNS = ("v.image_id, v.model_version, v.p_mel, v.predicted_label, v.threshold, v.entropy, v.mutual_info, v.mc_samples, "
           "v.gradcam_uri, v.needs_review, v.review_reasons, v.drop_id, v.run_id, v.scored_at, "
           "i.label AS known_label, i.lesion_id, i.patient_id, i.normalized_uri, i.original_uri, "
           "r.verdict AS review_verdict, r.label AS review_label, r.reviewer, r.reviewed_at, "
           "v.p_other, v.site, v.site_status, v.decision_uncertainty, v.attention_on_lesion")
LIKELY = "v.p_mel >= 0.5"
UNSURE = "v.review_reasons LIKE '%uncertain%'"
ORDER = (f"CASE WHEN i.label IS NULL THEN 0 ELSE 1 END, CASE WHEN {LIKELY} THEN 1 WHEN {UNSURE} THEN 2 ELSE 3 END, "
         f"CASE WHEN {LIKELY} THEN v.p_mel WHEN {UNSURE} THEN COALESCE(v.decision_uncertainty, -1.0) ELSE v.p_mel END DESC, "
         "ABS(v.p_mel - v.threshold), v.image_id")
DISAGREES = ("(r.id IS NOT NULL AND r.model_version <> v.model_version AND ((r.label IN ('MEL', 'NV') AND "
             "r.label <> v.predicted_label) OR (r.label = 'OTHER' AND v.predicted_label = 'NV' AND "
             "COALESCE(v.review_reasons, '') NOT LIKE '%out_of_scope%')))")
OPEN = f"(r.id IS NULL OR {DISAGREES})"
QUEUE = (f"SELECT {COLUMNS}, CASE WHEN {OPEN} THEN ROW_NUMBER() OVER (PARTITION BY CASE WHEN {OPEN} THEN 0 ELSE 1 END "
         f"ORDER BY {ORDER}) END AS queue_rank, r.model_version AS review_model_version, v.prediction_of "
         "FROM v_latest_predictions v JOIN images i ON i.image_id = v.image_id "
         "LEFT JOIN reviews r ON r.id = (SELECT max(id) FROM reviews x WHERE x.image_id = v.image_id) "
         f"WHERE v.needs_review OR {DISAGREES}")
# 0018's queue, for the downgrade
RANK_0018 = ("CASE WHEN r.id IS NULL THEN ROW_NUMBER() OVER (PARTITION BY CASE WHEN r.id IS NULL THEN 0 ELSE 1 END "
             f"ORDER BY {ORDER}) END AS queue_rank")
QUEUE_0018 = (f"SELECT {COLUMNS}, {RANK_0018} FROM v_latest_predictions v JOIN images i ON i.image_id = v.image_id "
              "LEFT JOIN reviews r ON r.id = (SELECT max(id) FROM reviews x "
              "WHERE x.image_id = v.image_id AND x.model_version = v.model_version) WHERE v.needs_review")


def _recreate(latest: str, queue: str) -> None:
    op.execute("DROP VIEW v_review_queue")
    op.execute("DROP VIEW v_latest_predictions")
    op.execute(f"CREATE VIEW v_latest_predictions AS {latest}")
    op.execute(f"CREATE VIEW v_review_queue AS {queue}")
    bind = op.get_bind()
    if bind.dialect.name == "postgresql" and bind.execute(
            sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE}).scalar():
        op.execute(f"GRANT SELECT ON v_latest_predictions, v_review_queue TO {ROLE}")


def upgrade() -> None:
    _recreate(LATEST, QUEUE)


def downgrade() -> None:
    _recreate(LATEST_0014, QUEUE_0018)
