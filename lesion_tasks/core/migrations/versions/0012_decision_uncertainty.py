"""`predictions.decision_uncertainty`: the share of a prediction's MC-dropout samples of p(MEL) on the other
side of the threshold it was decided at (0: every sample agrees with the decision; 0.5: a coin flip). The
review queue ranks by it: a case at p(MEL) 0.5 with a threshold of 0.1 is confidently MEL, one at 0.1 is not.
Existing rows are filled from their stored samples (`prediction_samples`); a row without samples stays NULL.
No view reads the column, so views and grants stay as they are; ALTER TABLE ADD / DROP COLUMN on both dialects.

Revision ID: 0012_decision_uncertainty
Revises: 0011_sites
Create Date: 2026-12-03
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0012_decision_uncertainty"
down_revision = "0011_sites"
branch_labels = None
depends_on = None
BATCH = 5000


def decision_uncertainty(samples: list[float], threshold: float, is_mel: bool) -> float:
    """The share of `samples` on the other side of `threshold` from the decision (`is_mel`)."""
    other = sum(1 for v in samples if (v < threshold if is_mel else v >= threshold))
    return other / len(samples) if samples else None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("decision_uncertainty", sa.Float, nullable=True))
    conn = op.get_bind()
    rows = conn.execute(sa.text(
        "SELECT p.image_id, p.model_version, p.threshold, p.predicted_label, s.p_mel_samples FROM predictions p "
        "JOIN prediction_samples s ON s.image_id = p.image_id AND s.model_version = p.model_version")).all()
    for start in range(0, len(rows), BATCH):
        values = []
        for r in rows[start:start + BATCH]:
            samples = r.p_mel_samples if isinstance(r.p_mel_samples, list) else json.loads(r.p_mel_samples)
            values.append({"i": r.image_id, "v": r.model_version,
                           "d": decision_uncertainty(samples, r.threshold, r.predicted_label == "MEL")})
        conn.execute(sa.text("UPDATE predictions SET decision_uncertainty = :d WHERE image_id = :i AND model_version = :v"),
                     values)


def downgrade() -> None:
    op.execute("ALTER TABLE predictions DROP COLUMN decision_uncertainty")
