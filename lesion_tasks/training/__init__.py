"""Training: a version trained from the split (`retrain`: features, head, calibration, thresholds, the
out-of-scope head, artifacts, its registry row) and cross-fitting over a site's labelled images (`crossfit`).
May import: core, ingest, model, data, versions, sites."""
