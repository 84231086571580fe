"""Scoring: nightly batch scoring of unscored images by the champion (shards, MC dropout, Grad-CAM,
upserted predictions) and the night summary.
May import: core, ingest, model, data, versions, sites."""
