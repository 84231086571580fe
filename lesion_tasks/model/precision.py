"""The backbone's numeric precision: float32, or bfloat16 on the CPU's matrix units.

With Keras' `mixed_bfloat16` policy a backbone keeps its weights in float32 and computes in bfloat16; oneDNN runs
that on AMX tiles or AVX512-BF16 where the CPU has them. Only the backbone: its pooled features and last activation
leave it as float32, and the head, MC dropout, calibration, thresholds and Grad-CAM (head weights times
activations: no gradient through the backbone) stay float32.

Measured here (`bench/score_benchmark.py`, `precision.*`; docs/model.md, "Backbone precision"): ResNet101V2 runs
1.8x faster in bfloat16 (54 -> 30 ms per image), but the small backbones run slower (the demo's multi-scale
MobileNet and EfficientNet-Lite0: 0.7x), and a version trained in float32 and scored in bfloat16 does not decide
the same (demo backbone, shared drops' test split: 93% of decisions agree, p99 |dp_mel| 0.21). Hence:
- `auto` (`LESION_BACKBONE_PRECISION`, default) trains in bfloat16 only a backbone measured faster in it
  (`FASTER_IN_BFLOAT16`) and only where the CPU has the units; every other backbone, and every backbone on a CPU
  without them, in float32, exactly as before (same feature-cache keys, same numbers). `float32` or `bfloat16`
  force either.
- A version is evaluated, gated and scored in the precision it was trained in (`ModelVersion.precision`, recorded
  in its lineage): its figures are those of the decisions it makes at night, whatever the scoring machine's setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lesion_tasks.core.settings import backbone_precision_setting

PRECISIONS = ("float32", "bfloat16")
SETTINGS = ("auto", *PRECISIONS)
BF16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of the units oneDNN uses for bfloat16
KERAS_POLICY = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
# backbones measured faster in bfloat16 on a CPU with the units: speedup of the pooled-feature pass (batches of 32)
FASTER_IN_BFLOAT16 = {"resnet101v2": 1.8}


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
def scope(name: str) -> Iterator[None]:
    """Keras layers built inside compute in precision `name` (bfloat16: `mixed_bfloat16`, float32 variables)."""
    import keras

    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(KERAS_POLICY[check(name)])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)
