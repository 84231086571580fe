"""Beyond a frozen backbone: does anything that fits the demo profile's 2-core budget beat the demo head
on the VALIDATION split? Printed as JSON (one line per epoch on stderr).

On an ingested, split home (e.g. the three shared drops after `lesion train --profile demo`):

    LESION_HOME=... LESION_WEIGHTS_DIR=../shared/weights .venv/bin/python bench/fine_tuning.py [--epochs 10]

Every image goes through the demo's 84 px effective resolution; MEL/NV train vs validation, class weights.
1. `frozen`: heads on the cached multiscale features: class-balanced logistic regression (binary; and
   multinomial over all eight diagnoses, OTHER training images included, scored p(MEL)/(p(MEL)+p(NV))),
   gradient boosting.
2. `partial`: MobileNet blocks 10-13 and the Table II head trained on cached block-9 activations
   (views 0 and 1), BatchNorm statistics frozen.
3. `full`: the whole multiscale MobileNet and the head, online flips/rot90/brightness/contrast.
Fine-tuned rows report their best epoch by validation AUC (a choice made on validation, so optimistic).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from sklearn.ensemble import HistGradientBoostingClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from lesion_tasks.model import backbones, evaluation, features
from lesion_tasks.data import trainset
from lesion_tasks.core.db import engine_for  # noqa: E402
from lesion_tasks.core.settings import Settings  # noqa: E402
from lesion_tasks.core.store import open_store  # noqa: E402

EFFECTIVE = 84
SIZE = 224


def scores(y, p, src):
    t = evaluation.threshold_for_sensitivity(y, p, 0.85)
    sharp = src == "isic2017-mel-nv"
    return {"val_auc": round(roc_auc_score(y, p), 4), "val_spec_at_sens85": round(float(((p < t) & (y == 0)).sum() / (y == 0).sum()), 4),
            "val_auc_isic2017": round(roc_auc_score(y[sharp], p[sharp]), 4) if sharp.any() else None}


def head(x, keras):
    x = keras.layers.GlobalAveragePooling2D()(x) if len(x.shape) == 4 else x
    x = keras.layers.Dense(128, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    return keras.layers.Dense(2, activation="softmax")(keras.layers.Dropout(0.5)(x))


def fit_epochs(name, model, train, val, y, src, epochs, keras):
    model.compile(keras.optimizers.Adam(2e-4), "sparse_categorical_crossentropy")
    best, started = None, time.monotonic()
    for epoch in range(epochs):
        model.fit(train, epochs=1, verbose=0)
        row = {"epoch": epoch + 1, **scores(y, model.predict(val, verbose=0)[:, 1], src)}
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
        best = row if best is None or row["val_auc"] > best["val_auc"] else best
    return {**best, "seconds_per_epoch": round((time.monotonic() - started) / epochs, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    settings = Settings.from_env()
    store, engine = open_store(settings), engine_for(settings)
    with engine.connect() as conn:
        parts, other = trainset.split_refs(conn), trainset.out_of_scope_refs(conn)
    (tr, ytr), (va, yva) = parts["train"], parts["val"]
    otr, otr_codes = other["train"]
    src = np.array([r.drop_id for r in va])
    weights = backbones.resolve_weights("imagenet", backbones.get_backbone("mobilenet025_multiscale"), settings.home / "cache", store)
    cfg = features.FeatureConfig("mobilenet025_multiscale", weights.sha256, SIZE, 0, effective_resolution=EFFECTIVE)
    out = {"train": len(tr), "train_mel": int(ytr.sum()), "val": len(va), "val_mel": int(yva.sum()), "frozen": {}}

    f = features.features_for(tr + va + otr, [0], cfg, weights, store)[0][0]
    xtr, xva, xo = f[: len(tr)], f[len(tr): len(tr) + len(va)], f[len(tr) + len(va):]
    scaler = StandardScaler().fit(np.concatenate([xtr, xo]))
    binary = LogisticRegression(C=0.01, class_weight="balanced", max_iter=3000).fit(scaler.transform(xtr), ytr)
    out["frozen"]["logistic_binary"] = scores(yva, binary.predict_proba(scaler.transform(xva))[:, 1], src)
    codes = np.concatenate([np.where(ytr == 1, "MEL", "NV"), otr_codes])
    multi = LogisticRegression(C=0.01, class_weight="balanced", max_iter=3000).fit(scaler.transform(np.concatenate([xtr, xo])), codes)
    pm = multi.predict_proba(scaler.transform(xva))
    mel, nv = list(multi.classes_).index("MEL"), list(multi.classes_).index("NV")
    out["frozen"]["logistic_8_diagnoses"] = scores(yva, pm[:, mel] / (pm[:, mel] + pm[:, nv]), src)
    boost = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, class_weight="balanced", random_state=0)
    out["frozen"]["gradient_boosting"] = scores(yva, boost.fit(xtr, ytr).predict_proba(xva)[:, 1], src)
    print(json.dumps({"frozen": out["frozen"]}), file=sys.stderr, flush=True)

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    def fresh_base():
        model = backbones._mobilenet025_multiscale(SIZE, weights.path)
        for layer in model.layers:  # BatchNorm statistics stay ImageNet's
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
        return model

    base = fresh_base()
    rgb = {name: np.stack([features.model_input(store, r.uri, cfg) for r in refs]) for name, refs in (("train", tr), ("val", va))}
    sample_weight = np.where(ytr == 1, len(ytr) / (2 * ytr.sum()), len(ytr) / (2 * (ytr == 0).sum())).astype(np.float32)

    # partial: cached block-9 activations of view 0 and 1
    prefix = tf.function(keras.Model(base.input, base.get_layer("conv_pw_9_relu").output))
    def activations(arrays):
        return np.concatenate([prefix(tf.constant(backbones.preprocess(arrays[i: i + 64]))).numpy() for i in range(0, len(arrays), 64)])
    views = np.concatenate([rgb["train"], np.stack([features.augment(x, r.image_id, 1) for x, r in zip(rgb["train"], tr)])])
    atr, ava = activations(views), activations(rgb["val"])
    inp = keras.Input(atr.shape[1:])
    x, maps = inp, [inp]
    names = [layer.name for layer in base.layers]
    for layer in base.layers[names.index("conv_pw_9_relu") + 1: names.index("conv_pw_13_relu") + 1]:
        x = layer(x)
        if layer.name.startswith("conv_pw_") and layer.name.endswith("_relu"):
            maps.append(x)
    pooled = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(m) for m in maps])
    train = tf.data.Dataset.from_tensor_slices((atr, np.tile(ytr, 2), np.tile(sample_weight, 2))).shuffle(len(atr), seed=0).batch(64)
    out["partial"] = fit_epochs("partial", keras.Model(inp, head(pooled, keras)), train, tf.data.Dataset.from_tensor_slices(ava).batch(256),
                                yva, src, args.epochs, keras)

    def augment(img):
        img = tf.image.rot90(tf.image.random_flip_left_right(tf.cast(img, tf.float32)), tf.random.uniform([], 0, 4, tf.int32))
        return tf.clip_by_value(tf.image.random_contrast(tf.image.random_brightness(img, 20.0), 0.85, 1.15), 0, 255) / 127.5 - 1.0
    train = (tf.data.Dataset.from_tensor_slices((rgb["train"], ytr, sample_weight)).shuffle(len(tr), seed=0)
             .map(lambda a, b, c: (augment(a), b, c), num_parallel_calls=2).batch(64).prefetch(2))
    val = tf.data.Dataset.from_tensor_slices(backbones.preprocess(rgb["val"])).batch(128)
    base = fresh_base()  # the partial run trained blocks 10-13 of the first one
    out["full"] = fit_epochs("full", keras.Model(base.input, head(base.output, keras)), train, val, yva, src, args.epochs, keras)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
