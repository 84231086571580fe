"""What the pipeline's alerts say, and when a night's predictions have shifted. No Airflow here: the DAGs
send what these functions build through Airflow's SMTP notifier (plugins/lesion_airflow.py, Connection
`lesion_alerts_smtp`; without it alerts are off).

Alerts, each with the model version, the numbers and links (the Airflow run, the report or review UI):
- `gate_refused`: `lesion_retrain` did not promote its model (every failed gate check, with its value);
- `nightly_failed`: a `lesion_nightly_score` run failed;
- `nightly_empty`: a `lesion_nightly_score` run could not score anything: there is no champion model;
- `distribution_shift`: tonight's predictions of the champion differ from the previous nights' of the same
  model version, pooled or at one site (`shift`, the rule below);
- `unvalidated_night`: most of tonight's predictions come from sites the champion was never validated at
  (`sites.nights.night_sites`);
- `site_failing`: tonight's predictions include cases from a site where the champion's own evidence puts it
  below a floor (status `failing`): every one of them went to review.

Distribution shift, the documented bound: for `p_mel` and for `entropy` separately, the two-sample
Kolmogorov-Smirnov statistic between this run's predictions and the previous runs' predictions of the same
model version (the REFERENCE_MAX most recent; on a version's first nights, with fewer than MIN_REFERENCE
before, its predictions on the validation split) is above KS_BOUND (0.2: the two empirical distributions are
20 percentage points apart somewhere) *and* significant at P_BOUND (0.01), so a small night does not alert on
noise. Nothing is compared below MIN_TONIGHT predictions tonight or MIN_REFERENCE before. The means and their
difference are reported with the statistics. Per site, a version's first run there (right after a promotion the new
champion re-scores every site's earlier drops in one run) compares the site's newest drop of the run with its earlier
drops: what the site sent before, under the same model.

`incoming_report` says what `isic_ingest` saw under `incoming/` when it found no new drop.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import sqlalchemy as sa

from lesion_tasks.assessment.gate import Decision
from lesion_tasks.core.db import engine_for
from lesion_tasks.core.schema import drops, images, predictions
from lesion_tasks.core.settings import Settings
from lesion_tasks.ingest.sources import INCOMING_PREFIX, READY_MARKER, Incoming

KS_BOUND = 0.2
P_BOUND = 0.01
MIN_TONIGHT = 30
MIN_REFERENCE = 100
REFERENCE_MAX = 5000
NO_CHAMPION = "no champion model: train one with lesion_retrain"


@dataclass(frozen=True)
class Alert:
    kind: str  # gate_refused | nightly_failed | nightly_empty | distribution_shift | unvalidated_night | site_failing
    subject: str
    lines: list[str]
    links: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        return "\n".join([*self.lines, "", *(f"{name}: {url}" for name, url in self.links.items())])

    def html(self) -> str:
        links = "".join(f'<li><a href="{html.escape(url, quote=True)}">{html.escape(name)}</a>: '
                        f"{html.escape(url)}</li>" for name, url in self.links.items())
        return (f"<pre>{html.escape(chr(10).join(self.lines))}</pre>" + (f"<ul>{links}</ul>" if links else ""))


# --- lesion_retrain ---------------------------------------------------------------------------------

def failed_checks(gate: dict[str, Any]) -> list[str]:
    """The gate's failed checks (each names the metric, its value and the floor or the champion's CI), as lines."""
    return [c.line for c in Decision.from_json(gate).failed]


def refusal(gate: dict[str, Any]) -> str:
    """One line for the skipped task and the run: 'NOT promoted: <reasons>'."""
    return f"NOT promoted: model {gate['model_version']}: " + ("; ".join(failed_checks(gate)) or "the gate refused it")


def gate_refused(gate: dict[str, Any], links: dict[str, str]) -> Alert:
    """`gate`: what `gate_model` answered (its checks, `assessment.gate.Decision`)."""
    decision = Decision.from_json(gate)
    failed = [c.line for c in decision.failed]
    lines = [f"Model version {gate['model_version']} was NOT promoted: {len(failed)} gate check(s) failed.",
             f"The champion stays: {gate.get('champion') or 'none (no model scores until one passes)'}.", "",
             "Failed:", *(f"  {r}" for r in failed), "", "Passed:", *(f"  {c.line}" for c in decision.passes)]
    if decision.notes:
        lines += ["", "Notes:", *(f"  {c.line}" for c in decision.notes)]
    return Alert("gate_refused", f"[lesion] model {gate['model_version']} NOT promoted ({len(failed)} gate check(s) failed)",
                 lines, links)


# --- lesion_nightly_score ---------------------------------------------------------------------------

def after_night(settings: Settings, summary: dict[str, Any], run_id: str,
                links: dict[str, str]) -> tuple[dict[str, Any] | None, list[Alert]]:
    """What a scored night (`nightly.summarize`'s summary) mails: (the shift check, or None when nothing was
    scored; the alerts): a distribution shift, a night mostly from sites the model was never validated at, and
    tonight's cases from sites where it is below a floor."""
    if not (summary.get("model_version") and summary.get("scored")):
        return None, []
    checked = shift(settings, summary["model_version"], run_id)
    out = [distribution_shift(checked, links)] if checked["shifted"] else []
    if summary["sites"]["mostly_unvalidated"]:
        out.append(unvalidated_night(summary, links))
    if summary["sites"]["failing_sites"]:
        out.append(site_failing(summary, links))
    return checked, out


def champion_version(settings: Settings) -> str | None:
    """The champion's model version, None without one (for a failure alert, which has no shard plan)."""
    from lesion_tasks.versions import registry

    engine = engine_for(settings)
    try:
        with engine.connect() as conn:
            champion = registry.version(conn, "champion", required=False)
            return champion.model_version if champion else None
    finally:
        engine.dispose()


def nightly_empty(run_id: str, links: dict[str, str]) -> Alert:
    return Alert("nightly_empty", "[lesion] nightly scoring scored nothing: no champion model",
                 [f"Run {run_id} of lesion_nightly_score scored no image: {NO_CHAMPION}.",
                  "Model version: none. Images wait unscored until a model passes the gate."], links)


def nightly_failed(run_id: str, model_version: str | None, failed_tasks: list[str], reason: str | None,
                   links: dict[str, str]) -> Alert:
    return Alert("nightly_failed", f"[lesion] nightly scoring FAILED (model {model_version or 'none'})",
                 [f"Run {run_id} of lesion_nightly_score failed{f' ({reason})' if reason else ''}.",
                  f"Model version: {model_version or 'none'}.",
                  f"Failed tasks ({len(failed_tasks)}): {', '.join(failed_tasks) or 'unknown'}.",
                  "Shards are idempotent: clear the failed tasks (or the run) to score what is still unscored."], links)


def _compare(tonight: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    from scipy.stats import ks_2samp

    ks = ks_2samp(tonight, reference)
    mean_t, mean_r = float(np.mean(tonight)), float(np.mean(reference))
    return {"mean_tonight": round(mean_t, 4), "mean_reference": round(mean_r, 4), "delta": round(mean_t - mean_r, 4),
            "ks": round(float(ks.statistic), 4), "p_value": float(ks.pvalue),
            "shifted": bool(ks.statistic > KS_BOUND and ks.pvalue < P_BOUND)}


def compare_nights(tonight: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """The shift rule on arrays {"p_mel": ..., "entropy": ...} (see the module's docstring)."""
    n_t, n_r = len(tonight["p_mel"]), len(reference["p_mel"])
    out: dict[str, Any] = {"n_tonight": n_t, "n_reference": n_r,
                           "bound": {"ks": KS_BOUND, "p_value": P_BOUND, "min_tonight": MIN_TONIGHT,
                                     "min_reference": MIN_REFERENCE}}
    if n_t < MIN_TONIGHT or n_r < MIN_REFERENCE:
        out.update(shifted=False, note=f"not compared: needs {MIN_TONIGHT} predictions tonight and {MIN_REFERENCE} "
                                       f"before ({n_t} and {n_r})")
        return out
    for name in ("p_mel", "entropy"):
        out[name] = _compare(np.asarray(tonight[name], float), np.asarray(reference[name], float))
    out["shifted"] = out["p_mel"]["shifted"] or out["entropy"]["shifted"]
    return out


def shift(settings: Settings, model_version: str, run_id: str) -> dict[str, Any]:
    """This run's predictions of `model_version` against the previous runs' (the REFERENCE_MAX newest): pooled,
    and per site (`by_site`: each site's predictions tonight against its own before), so one clinic whose
    scanner changed is not averaged away by the others."""
    engine = engine_for(settings)
    arrived = sa.func.coalesce(drops.c.finished_at, drops.c.started_at).label("arrived")
    cols = (predictions.c.p_mel, predictions.c.entropy, images.c.site, images.c.drop_id, arrived)
    of_version = predictions.c.model_version == model_version
    joined = (sa.select(*cols).join(images, images.c.image_id == predictions.c.image_id)
              .join(drops, drops.c.drop_id == images.c.drop_id))
    try:
        with engine.connect() as conn:
            now = conn.execute(joined.where(of_version, predictions.c.run_id == run_id)).all()
            before = conn.execute(joined.where(of_version, predictions.c.run_id != run_id)
                                  .order_by(predictions.c.scored_at.desc()).limit(REFERENCE_MAX)).all()
    finally:
        engine.dispose()

    reference, against = _arrays(before), "previous nights"
    if len(before) < MIN_REFERENCE:  # a first night (e.g. after a backlog): what the version was validated on
        val = _validation_reference(settings, model_version)
        if val is not None:
            reference, against = val, "the validation split (no earlier night of this version)"
    out = {"model_version": model_version, "run_id": run_id, **compare_nights(_arrays(now), reference),
           "reference": against}
    now_at, before_at = _by_site(now), _by_site(before)
    out["by_site"] = {name: _site_shift(now_at[name], before_at.get(name, [])) for name in sorted(now_at)}
    out["shifted_sites"] = [name for name, part in out["by_site"].items() if part["shifted"]]
    out["shifted"] = bool(out["shifted"] or out["shifted_sites"])
    return out


def _site_shift(now: list, before: list) -> dict[str, Any]:
    """One site's check: tonight against the version's earlier runs there; on its first run at the site (fewer than
    MIN_REFERENCE before), the run's newest drop of the site against its earlier drops (re-scored in this run, as after
    a promotion) and whatever came before."""
    if len(before) >= MIN_REFERENCE or len({r.drop_id for r in now}) < 2:
        return {**compare_nights(_arrays(now), _arrays(before)), "reference": "previous nights"}
    newest = max((r.arrived, r.drop_id) for r in now)[1]
    tonight = [r for r in now if r.drop_id == newest]
    earlier = [r for r in now if r.drop_id != newest]
    return {**compare_nights(_arrays(tonight), _arrays(before + earlier)), "tonight_drop": newest,
            "reference": "the site's earlier drops (first run of this version there)"}


def _by_site(rows: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in rows:
        out.setdefault(r.site, []).append(r)
    return out


def _arrays(rows: list) -> dict[str, np.ndarray]:
    return {"p_mel": np.array([r.p_mel for r in rows], float), "entropy": np.array([r.entropy for r in rows], float)}


def _validation_reference(settings: Settings, model_version: str) -> dict[str, np.ndarray] | None:
    """The version's validation predictions (p_mel, entropy), None where it has none stored."""
    from lesion_tasks.core.store import open_store
    from lesion_tasks.versions import artifacts

    try:
        return artifacts.ModelArtifacts(open_store(settings), model_version).validation_predictions()
    except artifacts.ArtifactError:
        return None


def distribution_shift(result: dict[str, Any], links: dict[str, str]) -> Alert:
    then = "before" if result.get("reference", "previous nights") == "previous nights" else "on validation"

    def line(name: str, s: dict[str, Any], then: str = then) -> str:
        return (f"  {name}: mean {s['mean_tonight']:.4f} tonight vs {s['mean_reference']:.4f} {then} "
                f"(delta {s['delta']:+.4f}); KS {s['ks']:.4f} (p = {s['p_value']:.2g})"
                f"{'  SHIFTED' if s['shifted'] else ''}")

    compared = "p_mel" in result
    which = [n for n in ("p_mel", "entropy") if compared and result[n]["shifted"]]
    sites = result.get("shifted_sites") or []
    against = result.get("reference", "previous nights")
    what = ("the previous nights' of the same version" if against == "previous nights"
            else "this version's predictions on its validation split (its first night: no earlier one to compare with)")
    lines = [f"Model version {result['model_version']}: tonight's predictions (run {result['run_id']}, "
             f"n = {result['n_tonight']}) differ from {what} "
             f"(n = {result['n_reference']})" + (f", at site(s) {', '.join(sites)}" if sites else "") + "."]
    if compared:
        lines += [line("p_mel", result["p_mel"]), line("entropy", result["entropy"])]
    for name in sites:
        part = result["by_site"][name]
        what = (f"drop {part['tonight_drop']} vs {part['n_reference']} of the site's earlier drops"
                if "tonight_drop" in part else f"{part['n_reference']} before")
        lines.append(f"Site {name} (n = {part['n_tonight']} tonight, {what}):")
        lines += [line(n, part[n], "before") for n in ("p_mel", "entropy")]
    lines.append(f"Bound: KS > {KS_BOUND} with p < {P_BOUND}, for p_mel or entropy, pooled or at one site. A new source, "
                 "scanner, population or a broken drop looks like this: review tonight's cases before trusting them.")
    subject = ", ".join(which + [f"site {n}" for n in sites])
    return Alert("distribution_shift", f"[lesion] prediction shift tonight ({subject}) for model {result['model_version']}",
                 lines, links)


def unvalidated_night(summary: dict[str, Any], links: dict[str, str]) -> Alert:
    """Most of a night's predictions come from sites the model was never validated at (`sites.nights.night_sites`)."""
    sites = summary["sites"]
    counts = ", ".join(f"{status} {n}" for status, n in sites["images_by_status"].items() if n)
    return Alert("unvalidated_night",
                 f"[lesion] tonight's predictions come mostly from unvalidated sites (model {summary['model_version']})",
                 [f"Run {summary['run_id']} of lesion_nightly_score, model version {summary['model_version']}: {sites['note']}",
                  f"Images by site status: {counts}."], links)


def site_failing(summary: dict[str, Any], links: dict[str, str]) -> Alert:
    """Tonight's cases from sites where the champion is below a floor (`sites.nights.night_sites`' `failing`)."""
    failing = summary["sites"]["failing"]
    n = sum(part["images"] for part in failing.values())
    return Alert("site_failing",
                 f"[lesion] {n} case(s) tonight from {len(failing)} site(s) where model {summary['model_version']} "
                 f"is below a floor: {', '.join(sorted(failing))}",
                 [f"Run {summary['run_id']} of lesion_nightly_score, model version {summary['model_version']}: {n} case(s) "
                  "came from sites where the model's own evidence (the site's test split) puts it below a gate floor. "
                  "Every one of them went to review (reason site_failing); do not act on these predictions alone.", "",
                  *(f"  {name}: {part['images']} case(s); {part['why']}" for name, part in sorted(failing.items())), "",
                  "Label more of each site's validation sample (lesion sites sample SITE), import the labels and retrain: "
                  "its own threshold, weights and calibration come from them."], links)


# --- isic_ingest ------------------------------------------------------------------------------------

def _names(keys: list[str]) -> str:
    shown = ", ".join(PurePosixPath(k).name for k in keys[:10])
    return f" ({shown}{', ...' if len(keys) > 10 else ''})" if keys else ""


def incoming_report(found: Incoming) -> str:
    """What `isic_ingest` saw under `incoming/` (`sources.survey_incoming`) when no drop is ready: drops already
    ingested, drops still settling (changing within LESION_INCOMING_SETTLE_SECONDS, no `_READY`) with the time
    each has left, loose files."""
    settling = [f"{PurePosixPath(k).name} in {_duration(left)}" for k, left in sorted(found.settling.items())]
    wait = (f" ({', '.join(settling)}, or at once with a {READY_MARKER} marker in the drop)" if settling else "")
    return (f"no new drop under {INCOMING_PREFIX}: {len(found.ingested)} drop(s) already ingested{_names(found.ingested)}, "
            f"{len(found.settling)} settling{wait}, {len(found.loose)} loose file(s) ignored{_names(found.loose)}")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0) + 0.999)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
