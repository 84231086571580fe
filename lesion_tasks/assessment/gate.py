"""The quality gate's decision, typed: every check passed, failed or noted, with its words and its figures.

Gate = enough evidence to decide at all (at least `GateFloors.min_melanomas` melanomas in the test and in the
validation split, validation AUC above chance) AND absolute floors on the frozen test split (melanoma
sensitivity at the chosen threshold, AUC, balanced accuracy; pooled and at every site with at least
`thresholds.MIN_SITE_MEL` test melanomas; out-of-scope recall) AND no significant regression against the
current champion on the same test images (paired bootstrap, 95%), pooled and per such site. A note (e.g. the
demo profile trained on fallback weights) never decides. Reasons show numbers rounded toward the side of the
bound they are on.

`Decision` is what the registry stores (`model_versions.gate`, `to_json`) and what every reader reads back
(`Decision.from_json`): the alert, the report, the review UI's hints. Nobody parses the words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

from lesion_tasks.model.config import GateFloors
from lesion_tasks.sites.thresholds import MIN_SITE_MEL
from lesion_tasks.versions.registry import ModelVersion

# out-of-scope floors apply when the test split has at least this many such images
MIN_OUT_OF_SCOPE = 30
OUTCOMES = ("pass", "fail", "note")


def shown(value: float, digits: int = 4, sign: bool = False, up: bool = False) -> str:
    """`value` with `digits` decimals, rounded down (toward -inf; `up`: toward +inf), so that against a
    bound of at most `digits` decimals the shown number is on the same side as the real one: rounded
    down for `value >= bound` ("0.5999 < floor 0.60", never "0.600 < 0.60"), up for `value > bound`."""
    q = Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_CEILING if up else ROUND_FLOOR)
    q = abs(q) if q == 0 else q  # no "-0.0000"
    return f"{q:+f}" if sign else f"{q:f}"


def bound(value: float) -> str:
    """A floor as written: two decimals when that is exact, else every digit it has."""
    return f"{value:.2f}" if float(f"{value:.2f}") == value else repr(float(value))


@dataclass(frozen=True)
class Check:
    """One check of the gate. `kind`: evidence, floor, out_of_scope, regression, champion or weights;
    `where`: the split or site it looked at ("test", "test[<site>]", "validation", ""); `figures`: the numbers
    it compared (value, floor, n, delta, ci95, ...)."""

    outcome: str  # "pass" | "fail" | "note"
    kind: str
    text: str
    where: str = ""
    figures: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"gate check outcome {self.outcome!r}: expected one of {', '.join(OUTCOMES)}")

    @property
    def line(self) -> str:
        """The check as one line of text: "PASS: ...", "FAIL: ..." or "NOTE: ..."."""
        return f"{self.outcome.upper()}: {self.text}"


@dataclass(frozen=True)
class Decision:
    """Every check of one gate decision, in the order they were made."""

    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.outcome == "fail"]

    @property
    def passes(self) -> list[Check]:
        return [c for c in self.checks if c.outcome == "pass"]

    @property
    def notes(self) -> list[Check]:
        return [c for c in self.checks if c.outcome == "note"]

    @property
    def reasons(self) -> list[str]:
        return [c.line for c in self.checks]

    def with_note(self, kind: str, text: str, **figures: Any) -> Decision:
        return Decision((*self.checks, Check("note", kind, text, figures=figures)))

    def to_json(self) -> dict[str, Any]:
        """What the registry stores: "passed", "reasons" (lines, for people) and "checks" (for readers)."""
        return {"passed": self.passed, "reasons": self.reasons, "checks": [asdict(c) for c in self.checks]}

    @classmethod
    def from_json(cls, gate: Mapping[str, Any] | None) -> Decision:
        """A stored gate (`to_json`, or a `gate_model` answer) read back; no gate yet: no checks."""
        checks = (gate or {}).get("checks") or []
        return cls(tuple(Check(c["outcome"], c["kind"], c["text"], c.get("where", ""), c.get("figures") or {})
                         for c in checks))


def _floor_checks(label: str, metrics: dict[str, Any], floors: GateFloors, note: str = "") -> list[Check]:
    """The floors of one test split; `note` (which threshold applied, and what set it) follows the
    threshold-dependent ones."""
    checks = []
    for name, floor in (("mel_sensitivity", floors.mel_sensitivity), ("auc", floors.auc),
                        ("balanced_accuracy", floors.balanced_accuracy)):
        value = metrics.get(name)
        figures = {"metric": name, "value": value, "floor": floor}
        if value is None:  # undefined (e.g. a test split with one class): never a pass
            checks.append(Check("fail", "floor", f"{label} {name} is undefined on this test split (floor {bound(floor)})",
                                label, figures))
            continue
        ok = value >= floor
        at = f" ({note})" if note and name != "auc" else ""
        checks.append(Check("pass" if ok else "fail", "floor",
                            f"{label} {name} {shown(value)} {'>=' if ok else '<'} floor {bound(floor)}{at}", label, figures))
    return checks


def _evidence_checks(metrics: dict[str, Any], floors: GateFloors) -> list[Check]:
    """Is there enough to decide on? Melanomas in test and validation (pooled), validation AUC above chance."""
    checks = []
    for split, name in (("test", "test"), ("val", "validation")):
        n = (metrics.get(split) or {}).get("n_mel")
        ok = n is not None and n >= floors.min_melanomas
        figures = {"n_mel": n, "need": floors.min_melanomas}
        checks.append(Check("pass", "evidence", f"evidence: {n} melanomas in {name} (>= {floors.min_melanomas})", name, figures)
                      if ok else
                      Check("fail", "evidence", f"too little evidence: {n if n is not None else 'no'} melanomas in {name} "
                                                f"(need >= {floors.min_melanomas})", name, figures))
    val = metrics.get("val") or {}
    low = ((val.get("ci95") or {}).get("auc") or [None])[0]
    value, what = (low, "validation AUC 95% CI lower bound") if low is not None else (val.get("auc"), "validation AUC")
    figures = {"metric": what, "value": value, "above": floors.val_auc_above}
    if value is None:
        checks.append(Check("fail", "evidence", f"too little evidence: {what} is undefined", "validation", figures))
    elif value > floors.val_auc_above:
        checks.append(Check("pass", "evidence", f"evidence: {what} {shown(value, up=True)} > {bound(floors.val_auc_above)} "
                                                "(chance)", "validation", figures))
    else:
        checks.append(Check("fail", "evidence", f"too little evidence: {what} {shown(value, up=True)} <= "
                                                f"{bound(floors.val_auc_above)} (chance)", "validation", figures))
    return checks


def _regression_checks(where: str, delta: dict[str, Any], champion: str) -> list[Check]:
    """AUC and melanoma sensitivity vs the champion on the same cases: a fail when the paired 95% interval of
    the difference lies wholly below 0, or when it is undefined."""
    checks = []
    label = f"{where} " if where else ""
    for name in ("auc", "mel_sensitivity"):
        lo, hi = delta[f"{name}_delta_ci95"]
        figures = {"metric": name, "champion": champion, "delta": delta[f"{name}_delta"], "ci95": [lo, hi]}
        if lo is None or hi is None or delta[f"{name}_delta"] is None:
            checks.append(Check("fail", "regression", f"{label}{name} vs champion {champion} is undefined on this test split",
                                where or "test", figures))
            continue
        worse = hi < 0
        checks.append(Check("fail" if worse else "pass", "regression",
                            f"{label}{name} vs champion {champion} delta {shown(delta[f'{name}_delta'], sign=True)} "
                            f"(95% CI {shown(lo, sign=True)}..{shown(hi, sign=True)})"
                            f"{' significantly worse' if worse else ''}", where or "test", figures))
    return checks


def decide(metrics: dict[str, Any], comparison: dict[str, Any] | None, floors: GateFloors,
           version: ModelVersion | None = None) -> Decision:
    """Every evidence, floor and regression check, passed or failed. Too little evidence (`_evidence_checks`) is
    never a pass. The floors apply to the pooled test split, to every site with at least MIN_SITE_MEL melanomas
    in test, and (with at least MIN_OUT_OF_SCOPE such test images) to the out-of-scope recall; the regression
    check vs the champion to the pooled test split and to each such site (`comparison["by_site"]`). With
    `version`, sensitivity and balanced accuracy say which threshold applied and whose target set it."""
    test = metrics["test"]
    checks = _evidence_checks(metrics, floors)
    pooled_note = version.threshold_note(None) if version is not None and version.threshold is not None else ""
    if pooled_note and test.get("thresholds_applied") == "per site":
        pooled_note = "each site at its own threshold where it has one, else " + pooled_note
    checks += _floor_checks("test", test, floors, pooled_note)
    # per site (each at its own threshold where it has one; `by_source` in metrics from before sites)
    for site, part in sorted((test.get("by_site") or test.get("by_source") or {}).items()):
        if (part.get("n_mel") or 0) >= MIN_SITE_MEL:
            note = version.threshold_note(site) if version is not None and version.threshold is not None else ""
            checks += _floor_checks(f"test[{site}]", part, floors, note)
    oos = (metrics.get("out_of_scope") or {}).get("test")
    if oos:
        for group, floor in (("all", floors.out_of_scope_flagged), ("malignant", floors.malignant_flagged)):
            part = oos[group]
            if part["n"] >= MIN_OUT_OF_SCOPE:
                ok = part["flagged"] >= floor
                checks.append(Check("pass" if ok else "fail", "out_of_scope",
                                    f"test out-of-scope ({group}, n={part['n']}) flagged {shown(part['flagged'])} "
                                    f"{'>=' if ok else '<'} floor {bound(floor)}", "test",
                                    {"group": group, "n": part["n"], "value": part["flagged"], "floor": floor}))
    if comparison is None:
        checks.append(Check("pass", "champion", "no champion to compare with"))
    else:
        checks += _regression_checks("", comparison, comparison["champion"])
        # no significant regression at any site with enough test melanomas of its own either
        for site, part in sorted((comparison.get("by_site") or {}).items()):
            checks += _regression_checks(f"test[{site}]", part, comparison["champion"])
    return Decision(tuple(checks))
