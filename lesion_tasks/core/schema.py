"""Table definitions (SQLAlchemy Core). Migrations under `migrations/` create exactly these; a test
checks that the migrated database and this module agree."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

LABELS = ("MEL", "NV", "OTHER")

drops = sa.Table(
    "drops",
    metadata,
    sa.Column("drop_id", sa.String(128), primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("layout", sa.String(128), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("n_entries", sa.Integer, nullable=False),
    sa.Column("accepted", sa.Integer, nullable=False, server_default="0"),
    sa.Column("quarantined", sa.Integer, nullable=False, server_default="0"),
    sa.Column("duplicates", sa.Integer, nullable=False, server_default="0"),
    sa.Column("reasons", sa.JSON, nullable=True),
    sa.Column("manifest_uri", sa.Text, nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("error", sa.Text, nullable=True),  # why a `failed` drop failed
    sa.Column("site", sa.String(128), nullable=True, index=True),  # where the drop came from (ingest.sources.resolve_site)
    sa.CheckConstraint("status IN ('running', 'complete', 'failed')", name="ck_drops_status"),
)

images = sa.Table(
    "images",
    metadata,
    sa.Column("image_id", sa.String(128), primary_key=True),
    sa.Column("drop_id", sa.String(128), sa.ForeignKey("drops.drop_id"), nullable=False, index=True),
    sa.Column("source_entry", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("label", sa.String(8), nullable=True, index=True),
    sa.Column("diagnosis", sa.Text, nullable=True),
    sa.Column("label_source", sa.String(128), nullable=True),
    sa.Column("lesion_id", sa.String(128), nullable=True, index=True),
    sa.Column("patient_id", sa.String(128), nullable=True),
    sa.Column("near_dup_group", sa.String(128), nullable=False, index=True),
    sa.Column("phash", sa.String(16), nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("n_bytes", sa.BigInteger, nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("conversions", sa.String(128), nullable=True),
    sa.Column("original_uri", sa.Text, nullable=False),
    sa.Column("normalized_uri", sa.Text, nullable=False),
    sa.Column("normalized_size", sa.Integer, nullable=False),
    sa.Column("metadata", sa.JSON, nullable=True),
    sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
    # the clinic / collection the image came from: its drop's site, the one definition of an image's site.
    # Ingest always writes it (`ingest.sources.resolve_site`: --site, site.txt, the store layout, else the drop
    # id); migration 0011 gave earlier rows their drop id. Readers read it as it is.
    sa.Column("site", sa.String(128), nullable=True, index=True),
    sa.CheckConstraint("label IS NULL OR label IN ('MEL', 'NV', 'OTHER')", name="ck_images_label"),
    sa.UniqueConstraint("sha256", name="uq_images_sha256"),
)

quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("drop_id", sa.String(128), sa.ForeignKey("drops.drop_id"), nullable=False, index=True),
    sa.Column("entry", sa.Text, nullable=False),
    sa.Column("reason", sa.String(64), nullable=False, index=True),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("image_id", sa.String(128), nullable=True),
    sa.Column("sha256", sa.String(64), nullable=True),
    sa.Column("raw_uri", sa.Text, nullable=True),
    sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("drop_id", "entry", name="uq_quarantine_drop_entry"),
)

SPLITS = ("train", "val", "test")

splits = sa.Table(
    "splits",
    metadata,
    sa.Column("image_id", sa.String(128), sa.ForeignKey("images.image_id"), primary_key=True),
    sa.Column("split", sa.String(8), nullable=False, index=True),
    sa.Column("rule", sa.String(128), nullable=False),
    sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("split IN ('train', 'val', 'test')", name="ck_splits_split"),
)

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("model_version", sa.String(128), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("profile", sa.String(32), nullable=False),
    sa.Column("backbone", sa.String(64), nullable=False),
    sa.Column("image_size", sa.Integer, nullable=False),
    sa.Column("threshold", sa.Float, nullable=True),
    sa.Column("mc_samples", sa.Integer, nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("environment", sa.JSON, nullable=False),
    sa.Column("weights_source", sa.Text, nullable=False),
    sa.Column("weights_sha256", sa.String(64), nullable=True),
    sa.Column("lineage", sa.JSON, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=True),
    sa.Column("gate", sa.JSON, nullable=True),
    sa.Column("review_rule", sa.JSON, nullable=True),
    sa.Column("model_uri", sa.Text, nullable=True),
    sa.Column("report_uri", sa.Text, nullable=True),
    sa.Column("metrics_uri", sa.Text, nullable=True),
    sa.Column("code_version", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(256), nullable=False),
    sa.Column("is_champion", sa.Boolean, nullable=False, server_default=sa.false()),
    # when `lesion gc` deleted the version's heavy artifacts (model, head, figures, overlays): it can no
    # longer score nor be promoted; the row, its metrics.json and report.html stay (retention.py)
    sa.Column("artifacts_pruned_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('training', 'candidate', 'champion', 'retired', 'rejected')", name="ck_model_versions_status"),
    sa.Index("uq_one_champion", "is_champion", unique=True,
             sqlite_where=sa.text("is_champion"), postgresql_where=sa.text("is_champion")),
)

champion_history = sa.Table(
    "champion_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_version", sa.String(128), sa.ForeignKey("model_versions.model_version"), nullable=False),
    sa.Column("event", sa.String(16), nullable=False),
    sa.Column("previous", sa.String(128), nullable=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("event IN ('promoted', 'override')", name="ck_champion_history_event"),
)

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("image_id", sa.String(128), sa.ForeignKey("images.image_id"), primary_key=True),
    sa.Column("model_version", sa.String(128), sa.ForeignKey("model_versions.model_version"), primary_key=True),
    sa.Column("p_mel", sa.Float, nullable=False),
    sa.Column("predicted_label", sa.String(8), nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("entropy", sa.Float, nullable=False),
    sa.Column("mutual_info", sa.Float, nullable=False),
    sa.Column("mc_samples", sa.Integer, nullable=False),
    sa.Column("gradcam_uri", sa.Text, nullable=True),  # NULL once `lesion gc` removed the overlay (retention.py)
    sa.Column("needs_review", sa.Boolean, nullable=False),
    sa.Column("review_reasons", sa.String(256), nullable=True),
    sa.Column("drop_id", sa.String(128), nullable=False, index=True),
    sa.Column("run_id", sa.String(256), nullable=False, index=True),
    sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False, index=True),
    # p(neither MEL nor NV, e.g. basal cell carcinoma): the out-of-scope head; NULL for versions without one
    sa.Column("p_other", sa.Float, nullable=True),
    # the share of the MC-dropout samples on the other side of the threshold applied (0: every sample agrees
    # with the decision, 0.5: a coin flip): what the review queue ranks its unsure decisions by (the view
    # v_review_queue.queue_rank, migration 0018, is its default order); NULL for rows without samples
    sa.Column("decision_uncertainty", sa.Float, nullable=True),
    # the share of the Grad-CAM map's mass inside the segmented lesion (model/attention.py); NULL: no lesion
    # segmented, or scored before it was measured
    sa.Column("attention_on_lesion", sa.Float, nullable=True),
    sa.CheckConstraint("predicted_label IN ('MEL', 'NV')", name="ck_predictions_label"),
    # the review queue of one model version, without scanning every version's rows
    sa.Index("ix_predictions_version_review", "model_version", "needs_review"),
)

VERDICTS = ("agree", "disagree", "set_label")

reviews = sa.Table(
    "reviews",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("submission_id", sa.String(64), nullable=False),  # one per form: a resubmitted form is a no-op
    sa.Column("image_id", sa.String(128), sa.ForeignKey("images.image_id"), nullable=False, index=True),
    sa.Column("model_version", sa.String(128), sa.ForeignKey("model_versions.model_version"), nullable=False),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("label", sa.String(8), nullable=False),
    sa.Column("note", sa.Text, nullable=True),
    sa.Column("reviewer", sa.String(256), nullable=False),
    sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("p_mel", sa.Float, nullable=False),  # what the reviewer was shown
    sa.Column("predicted_label", sa.String(8), nullable=False),
    sa.Column("p_other", sa.Float, nullable=True),  # shown too (NULL: the version has no out-of-scope head)
    sa.CheckConstraint("verdict IN ('agree', 'disagree', 'set_label')", name="ck_reviews_verdict"),
    sa.CheckConstraint("label IN ('MEL', 'NV', 'OTHER')", name="ck_reviews_label"),
    sa.UniqueConstraint("submission_id", name="uq_reviews_submission"),
)

prediction_samples = sa.Table(
    "prediction_samples",
    metadata,
    sa.Column("image_id", sa.String(128), primary_key=True),
    sa.Column("model_version", sa.String(128), primary_key=True),
    sa.Column("p_mel_samples", sa.JSON, nullable=False),
    sa.ForeignKeyConstraint(["image_id", "model_version"], ["predictions.image_id", "predictions.model_version"],
                            ondelete="CASCADE"),
)


# a site's validation sample: the images to label first, in order, each with the probability with which
# it was drawn (sites.py); rows are only ever added, so the sample extends and never redraws
site_samples = sa.Table(
    "site_samples",
    metadata,
    sa.Column("site", sa.String(128), primary_key=True),
    sa.Column("image_id", sa.String(128), sa.ForeignKey("images.image_id"), primary_key=True),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("stratum", sa.String(32), nullable=False),
    sa.Column("inclusion_probability", sa.Float, nullable=False),
    sa.Column("drawn_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("site", "rank", name="uq_site_samples_rank"),
)

# every row of every `lesion labels import` file, applied or not (a conflict with an ISIC label is
# recorded here and never applied): append-only, an entry per (run, line) whose outcome is new for its
# (file, line); the latest entry of a (file, line) says what it did to the labels, a rerun that changes
# nothing adds nothing (ingest/label_import.py)
label_imports = sa.Table(
    "label_imports",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), nullable=False),
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
    sa.UniqueConstraint("run_id", "line", name="uq_label_imports_run_line"),
    sa.Index("ix_label_imports_file_line", "file_sha256", "line"),
)

# a model version's operating point at each site (`sites.operating`): the threshold scoring decides the site's cases
# at, how it was chosen ("pooled", "unlabelled", "labelled") and what it promises (`point`: the JSON of
# `lesion sites --json`); re-estimated after every scoring run, the latest one applied
site_operating_points = sa.Table(
    "site_operating_points",
    metadata,
    sa.Column("model_version", sa.String(128), sa.ForeignKey("model_versions.model_version"), primary_key=True),
    sa.Column("site", sa.String(128), primary_key=True),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("out_of_scope_above", sa.Float, nullable=True),
    sa.Column("point", sa.JSON, nullable=False),
    sa.Column("run_id", sa.String(250), nullable=True),
    sa.Column("estimated_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("method IN ('pooled', 'unlabelled', 'labelled')", name="ck_site_operating_points_method"),
)

SITE_STATUSES = ("unvalidated", "provisional", "validated", "failing")

# how a model version does at each site, by the evidence it was evaluated on (assess.py); the champion's
# rows give `v_sites.status` (and `site_status` in the prediction views)
site_evaluations = sa.Table(
    "site_evaluations",
    metadata,
    sa.Column("model_version", sa.String(128), sa.ForeignKey("model_versions.model_version"), primary_key=True),
    sa.Column("site", sa.String(128), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("evidence", sa.String(16), nullable=False),  # which out-of-sample predictions: "test"
    sa.Column("melanomas_evidence", sa.Integer, nullable=False),
    sa.Column("threshold", sa.Float, nullable=True),
    sa.Column("chosen_on", sa.String(16), nullable=False),  # "site" or "pooled"
    sa.Column("metrics", sa.JSON, nullable=True),
    sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('unvalidated', 'provisional', 'validated', 'failing')", name="ck_site_evaluations_status"),
)
