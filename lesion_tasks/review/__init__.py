"""Review: the review queue, cases and verdicts (`cases`), the FastAPI app the Airflow plugin mounts (`web`),
its charts, image previews and templates.
May import: core, ingest, model, data, versions, sites, training,
assessment, scoring."""
