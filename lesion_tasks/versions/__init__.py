"""The version record: `registry` owns a model version's row (`ModelVersion`, the typed view every other module
reads, and every write), `artifacts` its files in the store, and `predict` the one prediction path.
May import: core, ingest, model, data."""
