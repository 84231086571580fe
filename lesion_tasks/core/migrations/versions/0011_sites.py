"""Sites: every image and drop has a `site` (the clinic or collection it came from), backfilled with its
drop id; a site's validation sample (`site_samples`), the log of imported labels (`label_imports`) and how
each model version does at each site (`site_evaluations`).

- `v_sites`: one row per site (images, labelled images, the champion's status there: a champion's
  `validated`/`failing` as evaluated, else `provisional` where the site has labelled images of its own,
  else `unvalidated`).
- `v_latest_predictions` and `v_review_queue` gain `site` and `site_status` as their last columns; every
  other column keeps its name and position (as 0008 did for `p_other`). The views are dropped and created,
  and `lesion_reader` gets SELECT on them again (a dropped view takes its grants along).
- Downgrade drops what upgrade added; the site columns' indexes first (SQLite cannot drop an indexed
  column), then plain ALTER TABLE ... DROP COLUMN on both dialects (no table copy).

Revision ID: 0011_sites
Revises: 0010_review_p_other
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_sites"
down_revision = "0010_review_p_other"
branch_labels = None
depends_on = None

ROLE = "lesion_reader"
PREDICTION_COLUMNS = ("image_id", "model_version", "p_mel", "predicted_label", "threshold", "entropy", "mutual_info",
                      "mc_samples", "gradcam_uri", "needs_review", "review_reasons", "drop_id", "run_id", "scored_at")
CHAMPION = "FROM predictions p JOIN model_versions m ON m.model_version = p.model_version"
QUEUE_FROM = """FROM v_latest_predictions v JOIN images i ON i.image_id = v.image_id
        LEFT JOIN reviews r ON r.id = (SELECT max(id) FROM reviews x
                                       WHERE x.image_id = v.image_id AND x.model_version = v.model_version)
        WHERE v.needs_review"""
QUEUE_EXTRA = ("i.label AS known_label, i.lesion_id, i.patient_id, i.normalized_uri, i.original_uri, "
               "r.verdict AS review_verdict, r.label AS review_label, r.reviewer, r.reviewed_at")
LABELLED = "SUM(CASE WHEN i.label IS NOT NULL THEN 1 ELSE 0 END)"
SITES = f"""SELECT i.site AS site, COUNT(*) AS images, {LABELLED} AS labelled,
        CASE WHEN e.status IN ('validated', 'failing') THEN e.status
             WHEN {LABELLED} > 0 THEN 'provisional' ELSE 'unvalidated' END AS status,
        e.model_version AS evaluated_by, e.evidence, e.melanomas_evidence, e.threshold, e.chosen_on
        FROM images i LEFT JOIN (SELECT s.* FROM site_evaluations s JOIN model_versions m
                                 ON m.model_version = s.model_version WHERE m.is_champion) e ON e.site = i.site
        GROUP BY i.site, e.status, e.model_version, e.evidence, e.melanomas_evidence, e.threshold, e.chosen_on"""


def _views(with_sites: bool) -> dict[str, str]:
    p_cols = ", ".join(f"p.{c}" for c in PREDICTION_COLUMNS)
    v_cols = ", ".join(f"v.{c}" for c in PREDICTION_COLUMNS)
    if not with_sites:  # as 0008 made them
        return {"v_latest_predictions": f"SELECT {p_cols}, p.p_other {CHAMPION} WHERE m.is_champion",
                "v_review_queue": f"SELECT {v_cols}, {QUEUE_EXTRA}, v.p_other {QUEUE_FROM}"}
    return {"v_sites": SITES,
            "v_latest_predictions": f"SELECT {p_cols}, p.p_other, i.site, COALESCE(s.status, 'unvalidated') AS site_status "
                                    f"{CHAMPION} JOIN images i ON i.image_id = p.image_id "
                                    "LEFT JOIN v_sites s ON s.site = i.site WHERE m.is_champion",
            "v_review_queue": f"SELECT {v_cols}, {QUEUE_EXTRA}, v.p_other, v.site, v.site_status {QUEUE_FROM}"}


def _drop_views(with_sites: bool) -> None:
    for name in reversed(list(_views(with_sites))):  # the queue reads v_latest_predictions, which reads v_sites
        op.execute(f"DROP VIEW {name}")


def _create_views(with_sites: bool) -> None:
    views = _views(with_sites)
    for name, sql in views.items():
        op.execute(f"CREATE VIEW {name} AS {sql}")
    bind = op.get_bind()
    if bind.dialect.name == "postgresql" and bind.execute(
            sa.text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": ROLE}).scalar():
        tables = ", ".join([*views, *(("site_samples", "label_imports", "site_evaluations") if with_sites else ())])
        op.execute(f"GRANT SELECT ON {tables} TO {ROLE}")


def upgrade() -> None:
    _drop_views(with_sites=False)  # views first: SQLite re-checks every view against the tables it reads
    for table in ("drops", "images"):
        op.add_column(table, sa.Column("site", sa.String(128), nullable=True))
        op.execute(f"UPDATE {table} SET site = drop_id")
        op.create_index(f"ix_{table}_site", table, ["site"])
    op.create_table(
        "site_samples",
        sa.Column("site", sa.String(128), primary_key=True),
        sa.Column("image_id", sa.String(128), sa.ForeignKey("images.image_id"), primary_key=True),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("stratum", sa.String(32), nullable=False),
        sa.Column("inclusion_probability", sa.Float, nullable=False),
        sa.Column("drawn_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("site", "rank", name="uq_site_samples_rank"),
    )
    op.create_table(
        "label_imports",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("file_sha256", sa.String(64), nullable=False),
        sa.Column("line", sa.Integer, nullable=False),
        sa.Column("image_id", sa.String(128), nullable=True),
        sa.Column("diagnosis", sa.Text, nullable=True),
        sa.Column("label", sa.String(8), nullable=True),
        sa.Column("label_source", sa.String(128), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("outcome IN ('imported', 'unchanged', 'rejected')", name="ck_label_imports_outcome"),
        sa.UniqueConstraint("file_sha256", "line", name="uq_label_imports_file_line"),
    )
    op.create_table(
        "site_evaluations",
        sa.Column("model_version", sa.String(128), sa.ForeignKey("model_versions.model_version"), primary_key=True),
        sa.Column("site", sa.String(128), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("evidence", sa.String(16), nullable=False),
        sa.Column("melanomas_evidence", sa.Integer, nullable=False),
        sa.Column("threshold", sa.Float, nullable=True),
        sa.Column("chosen_on", sa.String(16), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=True),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('unvalidated', 'provisional', 'validated', 'failing')",
                           name="ck_site_evaluations_status"),
    )
    _create_views(with_sites=True)


def downgrade() -> None:
    _drop_views(with_sites=True)
    for table in ("site_evaluations", "label_imports", "site_samples"):
        op.drop_table(table)
    for table in ("images", "drops"):
        op.drop_index(f"ix_{table}_site", table_name=table)
        op.execute(f"ALTER TABLE {table} DROP COLUMN site")
    _create_views(with_sites=False)
