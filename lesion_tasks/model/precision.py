"""The backbone's numeric precision: float32, or bfloat16 on the CPU's matrix units.

In bfloat16 the backbone's compiled pass is frozen (its variables as constants) and rewritten by TensorFlow's
grappler pass for oneDNN (`auto_mixed_precision_onednn_bfloat16`): its convolutions, matrix products and the ops
between them compute in bfloat16 on AMX tiles or AVX512-BF16, with float32 at the pass's edges, and the weights are
cast and laid out once, when the graph is optimised (`compiled`). The model itself, its variables and the saved file
stay float32, and the option is part of each call's configuration, so only the calls made inside
`computing("bfloat16")` are rewritten: the head, MC dropout, calibration, thresholds and Grad-CAM (head weights
times activations: no gradient through the backbone) stay float32, and a function called outside runs its float32
instantiation, bit for bit. (Keras' `mixed_bfloat16` policy was the first route: 1.8x on ResNet101V2 here; the
rewrite alone 2.5x; frozen and rewritten 3.1x.)

Measured here (`bench/score_benchmark.py`, `precision.*`; docs/model.md, "Backbone precision"): ResNet101V2 runs
3.1x faster in bfloat16 (62 -> 20 ms per image; a night end to end 2.5x), but the small backbones gain little
(the demo's multi-scale MobileNet and EfficientNet-Lite0: 1.2-1.3x on the pass, not end to end), and a version
trained in float32 and scored in bfloat16 does not decide the same (demo backbone, shared drops' test split: 89% of
decisions agree). Hence:
- `auto` (`LESION_BACKBONE_PRECISION`, default) trains in bfloat16 only a backbone measured faster in it
  (`FASTER_IN_BFLOAT16`) and only where the CPU has the units; every other backbone, and every backbone on a CPU
  without them, in float32, exactly as before (same feature-cache keys, same numbers). `float32` or `bfloat16`
  force either.
- A version is evaluated, gated and scored in the precision it was trained in (`ModelVersion.precision`, recorded
  in its lineage): its figures are those of the decisions it makes at night, whatever the scoring machine's setting.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lesion_tasks.core.settings import backbone_precision_setting

PRECISIONS = ("float32", "bfloat16")
SETTINGS = ("auto", *PRECISIONS)
BF16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of the units oneDNN uses for bfloat16
REWRITE = "auto_mixed_precision_onednn_bfloat16"  # the grappler option (tf.config.optimizer)
ROUTE = "onednn-rewrite-frozen"  # how bfloat16 is computed: part of the feature cache's key (model/features.py)
_TOGGLE = threading.Lock()
# backbones measured faster in bfloat16 on a CPU with the units: speedup of the pooled-feature pass (batches of 32)
FASTER_IN_BFLOAT16 = {"resnet101v2": 3.1}


@dataclass(frozen=True)
class Precision:
    name: str  # "float32" | "bfloat16"
    why: str  # in words: the setting, and what the CPU has

    def record(self) -> dict[str, str]:
        return {"precision": self.name, "why": self.why}


def bf16_units(cpuinfo: str | None = None) -> list[str]:
    """The bfloat16 units this CPU announces (`cpuinfo`: /proc/cpuinfo's text; none where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[-1].split())
    return [u for u in BF16_UNITS if u in flags]


def choose(backbone: str, setting: str | None = None, cpuinfo: str | None = None) -> Precision:
    """The precision `backbone` is trained in on this machine, and why (module doc)."""
    setting = (setting if setting is not None else backbone_precision_setting()).strip().lower() or "auto"
    if setting not in SETTINGS:
        raise ValueError(f"LESION_BACKBONE_PRECISION={setting!r}: expected one of {', '.join(SETTINGS)}")
    units = bf16_units(cpuinfo)
    if setting == "float32":
        return Precision("float32", "LESION_BACKBONE_PRECISION=float32")
    if setting == "bfloat16":
        return Precision("bfloat16", "LESION_BACKBONE_PRECISION=bfloat16" + (
            f" (this CPU has {', '.join(units)})" if units else " (this CPU has no bfloat16 units: emulated, slower)"))
    if not units:
        return Precision("float32", f"auto: this CPU has no bfloat16 units ({', '.join(BF16_UNITS)})")
    if backbone not in FASTER_IN_BFLOAT16:
        return Precision("float32", f"auto: {backbone} is not faster in bfloat16 (measured: bench/score_benchmark.py)")
    return Precision("bfloat16", f"auto: this CPU has bfloat16 units ({', '.join(units)}) and {backbone} runs "
                                 f"{FASTER_IN_BFLOAT16[backbone]}x faster in bfloat16")


def of_version(name: str, cpuinfo: str | None = None) -> Precision:
    """The precision a version scores in: its own (module doc), said with what this CPU makes of it."""
    check(name)
    if name == "bfloat16" and not bf16_units(cpuinfo):
        return Precision(name, "the version's own (trained in it); this CPU has no bfloat16 units: emulated, slower")
    return Precision(name, "the version's own (trained in it)")


def check(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"backbone precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    return name


@contextlib.contextmanager
def computing(name: str) -> Iterator[None]:
    """Compiled TensorFlow functions called inside compute in precision `name` (module doc). bfloat16 sets the
    process-wide grappler option for the duration, one caller at a time: a compiled call another thread makes
    meanwhile is rewritten too, so keep it to the backbone's pass (the scoring's other threads read, decode and
    write; nothing else runs TensorFlow there)."""
    if check(name) == "float32":
        yield
        return
    import tensorflow as tf

    with _TOGGLE:
        before = bool(tf.config.optimizer.get_experimental_options().get(REWRITE, False))
        tf.config.optimizer.set_experimental_options({REWRITE: True})
        try:
            yield
        finally:
            tf.config.optimizer.set_experimental_options({REWRITE: before})


def compiled(model, batch_shape: tuple[int, ...], name: str):
    """`model`'s inference pass on float32 batches of `batch_shape`, compiled, to be called inside `computing(name)`;
    it returns what the model returns. float32: a plain tf.function (as before precisions existed). bfloat16: the
    pass frozen (its variables as constants), so that the rewrite casts and lays out the weights once, when it
    optimises the graph, instead of at every call (ResNet101V2 here: 23 -> 20 ms per image)."""
    import tensorflow as tf

    def infer(x):
        return model(x, training=False)

    fn = tf.function(infer, reduce_retracing=True)
    if check(name) == "float32":
        return fn
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = fn.get_concrete_function(tf.TensorSpec(batch_shape, tf.float32))
    frozen = convert_variables_to_constants_v2(concrete)

    def run_frozen(x):
        return tf.nest.pack_sequence_as(concrete.structured_outputs, frozen(x))
    return run_frozen
