"""Assessment: a trained version evaluated on the frozen test split (`assess`), the quality gate's typed
decision (`gate`), promotion, and the HTML report (`report`).
May import: core, ingest, model, data, versions, sites, training."""
