"""Lifecycle of a model version: the registry (`ModelVersion`, every write of its row), its artifacts, the
split and the training sets, the training config, retraining, evaluation, the gate, the report, and the one
predict path. May import: core, ingest, model."""
