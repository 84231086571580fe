"""Operations: consistency check, retention (gc), alerts, and the synthetic demo drop.
May import: every room below it (core, ingest, model, data, versions, sites, training, assessment,
scoring, review)."""
