"""The pure parts of test_versions.py (no trained home, no training): see tests/integration/test_versions.py for the rest."""

from __future__ import annotations



from lesion_tasks.training import retrain
from lesion_tasks.core import keys
from tests.helpers import tiny_config


def test_run_ids_that_slug_alike_get_different_versions():
    config = tiny_config()
    base = "manual__2026-11-26T08:00:00+00:00"
    variants = [base, base + ".", base + "~", base + ":", base + "-", base + "--", "x" * 300, "x" * 300 + "y"]
    ids = [retrain.model_version_id(r, config) for r in variants]
    assert len(set(ids)) == len(variants)
    assert all(len(i) <= 128 and keys.slug(i) == i for i in ids)
    assert retrain.model_version_id("first", config) == "demo-tiny-first"  # plain run ids stay readable
