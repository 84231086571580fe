"""The pure parts of test_scoring.py (no trained home, no training): see tests/integration/test_scoring.py for the rest."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lesion_tasks.versions.registry import ReviewRule
from lesion_tasks.versions import predict
from lesion_tasks.model import backbones, gradcam, mc


def test_uncertain_means_the_decision_could_go_either_way():
    """A confident melanoma call far above a low threshold (p 0.5, entropy ln 2) is not `uncertain`; a case
    whose samples straddle its threshold is, at any entropy. Versions trained before the rule keep theirs."""
    rule = ReviewRule.from_json({"predicted_mel": True, "decision_uncertainty_above": 0.2, "out_of_scope_above": 0.9})
    assert "uncertain" not in predict.review_reasons(0.5, math.log(2), 0.1, rule, decision_uncertainty=0.0)
    assert "uncertain" in predict.review_reasons(0.12, 0.37, 0.1, rule, decision_uncertainty=0.3)
    with pytest.raises(ValueError, match="decision_uncertainty"):
        predict.review_reasons(0.12, 0.37, 0.1, rule)
    old = ReviewRule.from_json({"predicted_mel": True, "entropy_above": 0.6, "out_of_scope_above": 0.9})
    assert "uncertain" in predict.review_reasons(0.5, math.log(2), 0.1, old, decision_uncertainty=0.0)

@pytest.mark.parametrize("backbone,size", [("tiny", 64), ("mobilenet025_multiscale", 96)])
def test_fast_gradcam_equals_gradient_tape(backbone, size):
    """Grad-CAM from the head's gradient equals a GradientTape through the whole model (rel. diff <= 1e-4)."""
    import keras

    weights = backbones.resolve_weights("none", backbones.get_backbone(backbone), None)
    model = backbones.build_model(backbone, size, weights, 0.5, seed=3)
    rng = np.random.default_rng(0)
    model.get_layer("head_bn").set_weights([rng.uniform(0.5, 2, 128), rng.normal(0, .5, 128), rng.normal(0, .5, 128), rng.uniform(0.5, 2, 128)])
    x = rng.uniform(-1, 1, (6, size, size, 3)).astype(np.float32)
    last = backbones.get_backbone(backbone).last_activation
    cut = keras.Model(model.input, [model.get_layer(last).output, model.get_layer("head_gap").output])
    activations, pooled = (t.numpy() for t in cut(x, training=False))
    head = mc.HeadWeights.from_model(model)
    cls = (head.deterministic(pooled) >= 0.5).astype(np.int64)
    fast = gradcam.gradcam_fast(activations, gradcam.head_gradient(head, pooled, cls), normalize=False)
    tape = gradcam.gradcam_tape(model, last, x, cls, normalize=False)
    assert np.linalg.norm(fast - tape) / max(np.linalg.norm(tape), 1e-12) <= 1e-4
