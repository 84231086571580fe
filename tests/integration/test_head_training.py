"""Training a head (Keras): the unit tier fits none, so these live here. Cross-fitting scores each of a sampled
site's labelled images with a head that never saw it; unit sample weights train the same head as none; head
training is deterministic and leaves TensorFlow's op determinism as it found it."""

from __future__ import annotations

import numpy as np

from lesion_tasks.model.training import fit_head
from lesion_tasks.training import crossfit
from tests.helpers import labelled_features


def test_out_of_fold_scores_each_site_image_with_a_head_that_never_saw_it():
    rng = np.random.default_rng(0)
    train = labelled_features(rng, 160, lambda i: "clinic" if i % 4 == 0 else "archive", "t")
    val = labelled_features(rng, 60, lambda i: "clinic" if i % 3 == 0 else "archive", "v")
    seen: list[tuple[set[str], set[str]]] = []
    ids_of = {x.tobytes(): i for part in (train, val) for x, i in zip(part.views[0], part.ids)}

    def fit(views, y, x_val, y_val, sample_weight):
        seen.append(({ids_of[x.tobytes()] for x in views[0]}, {ids_of[x.tobytes()] for x in x_val}))
        assert sample_weight is None or len(sample_weight) == len(y)
        return fit_head(views, y, x_val, y_val, 0.3, 8, 0)[0]

    oof = crossfit.out_of_fold("clinic", train, val, fit, "v1", 10, 0)
    clinic = {i for part in (train, val) for i, s in zip(part.ids, part.sites) if s == "clinic"}
    assert oof is not None and set(oof.ids) == clinic and len(oof.ids) == len(clinic) == 40 + 20
    assert oof.folds == 5 and len(seen) == 5
    assert np.all((oof.p > 0) & (oof.p < 1))
    # fold by fold: the images a head scored are in neither its training nor its early-stopping data
    folds = [clinic - trained - stopped for trained, stopped in seen]
    assert all(folds) and set().union(*folds) == clinic and sum(map(len, folds)) == len(clinic)
    lesion_of = dict(zip(oof.ids, oof.lesions))
    lesions = [{lesion_of[i] for i in fold} for fold in folds]
    assert sum(map(len, lesions)) == len(set().union(*lesions))  # a lesion's photographs share one fold


def test_unit_sample_weights_train_the_same_head_as_none():
    rng = np.random.default_rng(2)
    y = np.array([0, 1] * 30)
    x = (rng.normal(size=(60, 6)) + y[:, None]).astype(np.float32)
    a = fit_head([x], y, x[:20], y[:20], 0.3, 5, 0)[0]
    b = fit_head([x], y, x[:20], y[:20], 0.3, 5, 0, sample_weight=np.ones(60))[0]
    c = fit_head([x], y, x[:20], y[:20], 0.3, 5, 0, sample_weight=np.where(y == 1, 5.0, 1.0))[0]
    wa, wb, wc = (m.get_layer("head_out").get_weights()[0] for m in (a, b, c))
    assert np.array_equal(wa, wb) and not np.array_equal(wa, wc)


def test_head_training_is_deterministic_and_leaves_op_determinism_as_it_was():
    from tensorflow.python.framework import config as tf_config

    from lesion_tasks.model.training import fit_head

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(160, 16)).astype(np.float32), (rng.random(160) < 0.3).astype(int)
    xv, yv = rng.normal(size=(40, 16)).astype(np.float32), (rng.random(40) < 0.3).astype(int)
    y[:2], yv[:2] = 1, 1
    runs = [fit_head([x, x + 0.05], y, xv, yv, 0.5, epochs=6, seed=s, patience=3)[:2] for s in (3, 3, 4)]
    (h1, hist1), (h2, hist2), (h3, _) = runs
    assert hist1 == hist2
    for w1, w2 in zip(h1.get_weights(), h2.get_weights()):
        np.testing.assert_array_equal(w1, w2)
    assert not all(np.array_equal(w1, w3) for w1, w3 in zip(h1.get_weights(), h3.get_weights()))  # the seed matters
    assert not tf_config.is_op_determinism_enabled()  # scoped to the training
