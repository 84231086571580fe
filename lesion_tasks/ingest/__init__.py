"""Ingest: reading a drop (folder, zip, store prefix), examining each entry, ISIC labels and metadata,
near-duplicates, and `drop.ingest`, which accepts or quarantines every entry with a reason.
May import: core."""
