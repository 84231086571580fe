"""Figures (PNG) and one self-contained HTML report per model version.

The report is written when the version is evaluated, with its gate section pending, and that section
is rewritten (`with_gate`) once the gate has decided and again after every promotion or manual override
involving the version: the decision, every reason, the champion compared with and the promotion history.
Numbers are shown rounded toward the side of the gate's floors they are on (`gate.shown`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from lesion_tasks.assessment.gate import Decision, shown
from lesion_tasks.model.evaluation import clopper_pearson
from lesion_tasks.versions.registry import ModelVersion, SiteThreshold

GATE_BEGIN, GATE_END = "<!--gate:begin-->", "<!--gate:end-->"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def training_curves(history: dict[str, list[float]]) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in ("loss", "val_loss"):
        if key in history:
            ax.plot(range(1, len(history[key]) + 1), history[key], label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("class-weighted cross-entropy")
    ax.legend()
    ax.set_title("Head training")
    return _png(fig)


def roc_figure(y: np.ndarray, p: np.ndarray, t: float, auc: float) -> bytes:
    from sklearn.metrics import roc_curve

    plt = _plt()
    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUC {auc:.3f}")
    pred = p >= t
    ax.scatter([(pred & (y == 0)).sum() / max((y == 0).sum(), 1)], [(pred & (y == 1)).sum() / max((y == 1).sum(), 1)],
               color="red", zorder=3, label=f"threshold {t:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("melanoma sensitivity")
    ax.legend(loc="lower right")
    ax.set_title("ROC (test)")
    return _png(fig)


def reliability_figure(table: list[dict[str, Any]], ece: float, title: str = "after calibration") -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot([r["mean_p"] for r in table], [r["frac_mel"] for r in table], "o-")
    ax.set_xlabel("mean p(MEL)")
    ax.set_ylabel("fraction melanoma")
    ax.set_title(f"Reliability {title} (ECE {ece:.3f})")
    return _png(fig)


def confusion_figure(matrix: list[list[float]], title: str, fmt: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.4, 3))
    arr = np.array(matrix, float)
    ax.imshow(arr, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, format(arr[i, j], fmt), ha="center", va="center",
                    color="white" if arr[i, j] > arr.max() / 2 else "black")
    ax.set_xticks([0, 1], ["NV", "MEL"])
    ax.set_yticks([0, 1], ["NV", "MEL"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _png(fig)


def referral_figure(curve: list[dict[str, Any]]) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = [100 * r["referred"] for r in curve]
    for key in ("mel_sensitivity", "mel_specificity", "auc"):
        ax.plot(x, [r[key] for r in curve], "o-", label=key)
    ax.set_xlabel("% most uncertain cases referred (entropy)")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title("Referral curve (test)")
    return _png(fig)


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _cell(value: Any, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and not np.isfinite(value)) else shown(value, digits)


def _share(rate: float | None, n: int | None, digits: int = 3) -> str:
    """A share with what it is out of and its exact (Clopper-Pearson) 95% interval: "4/4 = 1.000 (0.398-1.000)"
    (a share of 4 test images is no certainty). Shares of whole counts only: rate x n is the count."""
    if rate is None or not n:
        return "–"
    k = int(round(rate * n))
    low, high = clopper_pearson(k, n)
    return f"{k}/{n} = {rate:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def _site_table(metrics: dict[str, Any], thresholds: Mapping[str, SiteThreshold]) -> str:
    """Per-site test metrics (IPW-weighted where a site's labels come from its validation sample) and the
    threshold each site is decided at: its own (how it was chosen) or the pooled one. The gate applies its
    floors to every site with enough test melanomas."""
    sites = metrics["test"].get("by_site") or metrics["test"].get("by_source") or {}
    names = sorted(set(sites) | set(thresholds))
    if not names:
        return ""
    rows = []
    for name in names:
        m, t = sites.get(name, {}), thresholds.get(name)
        ci = m.get("ci95", {})

        def cell(key: str, m=m, ci=ci) -> str:
            interval = f" ({ci[key][0]:.3f} – {ci[key][1]:.3f})" if key in ci else ""
            return f"<td>{_cell(m.get(key))}{interval}</td>"

        applied = (f"{t.threshold:.4f}: {'own' if t.own else 'pooled'}"
                   + (f", {html.escape(t.method)} on {t.n_mel} melanomas" if t.method else "")
                   if t else "–")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{applied}</td><td>{m.get('n', 0)}</td><td>{m.get('n_mel', 0)}</td>"
                    f"{cell('auc')}{cell('mel_sensitivity')}{cell('mel_specificity')}{cell('balanced_accuracy')}"
                    f"<td>{_cell(m.get('ece'))}</td></tr>")
    return ("<h2>Per site (test)</h2><p>Every site is decided at the threshold in its row: its own where its labelled "
            "images hold enough melanomas, else the pooled one. A site with no test images has empty figures.</p>"
            "<table><tr><th>site</th><th>threshold applied</th><th>n</th><th>melanoma</th><th>AUC</th>"
            "<th>sensitivity</th><th>specificity</th><th>balanced accuracy</th><th>ECE</th></tr>" + "".join(rows) + "</table>")


def attention_table(summary: dict[str, Any] | None) -> str:
    """Where Grad-CAM looks on a seeded sample of test cases, per true class and right/wrong."""
    if not summary:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(cell)}</td><td>{c['n']}</td><td>{c['n_measured']}</td>"
        f"<td>{'–' if not c['n_measured'] else format(c['mean_on_lesion'], '.0%')}</td><td>{c['off_lesion']}</td></tr>"
        for cell, c in summary["cells"].items())
    return (f"<h3>Grad-CAM attention on the lesion</h3><p>The share of each Grad-CAM map's mass inside the lesion, "
            f"segmented classically (Otsu on the blue channel after hair and dark-corner removal), on up to "
            f"{summary['per_cell']} test cases per row drawn at random (seeded). "
            f"Below {summary['off_lesion_below']:.0%} the attention lies mostly off the lesion (skin, bubbles, "
            f"corners): nightly, a melanoma call whose map lies so is flagged <code>attention_off_lesion</code> (the NV "
            f"map of a two-class head lies on the skin around the lesion almost always).</p>"
            f"<table id='attention'><tr><th>true class, decision</th><th>cases</th><th>lesion segmented</th>"
            f"<th>mean share on the lesion</th><th>mostly off the lesion</th></tr>{rows}</table>")


def _scope_table(metrics: dict[str, Any]) -> str:
    """Out-of-scope recall per diagnosis (flagged = out_of_scope or predicted MEL)."""
    oos = (metrics.get("out_of_scope") or {}).get("test")
    if not oos:
        return "<h2>Out of scope</h2><p>This version has no out-of-scope head (no OTHER images in training).</p>"
    rows = [(name, oos[name]) for name in ("all", "malignant")] + sorted(oos["by_diagnosis"].items())
    body = "".join(f"<tr><td>{html.escape(name)}</td><td>{r['n']}</td><td>{_share(r['flagged'], r['n'])}</td>"
                   f"<td>{_share(r['out_of_scope'], r['n'])}</td><td>{_share(r['predicted_mel'], r['n'])}</td></tr>"
                   for name, r in rows)
    n_nv, n_mel = oos.get("n_nv"), oos.get("n_mel")  # (versions before the counts were kept: the shares alone)

    def price(key: str, n: int | None) -> str:
        return _share(oos[key], n) if n else _cell(oos[key])
    return (f"<h2>Out of scope (test, threshold p_other &ge; {oos['threshold']:.4f})</h2><p>Shares as count/n = share "
            "(exact 95% interval).</p><table><tr><th>diagnosis</th>"
            "<th>n</th><th>flagged</th><th>out_of_scope</th><th>predicted MEL</th></tr>" + body + "</table>"
            f"<p>Price: {price('nv_flagged_out_of_scope', n_nv)} of nevi and {price('mel_flagged_out_of_scope', n_mel)} "
            "of melanomas are flagged out_of_scope too"
            + (f"; {price('nv_flagged_out_of_scope_only', n_nv)} of nevi by out_of_scope alone (no MEL call: the review "
               "work it adds)" if oos.get("nv_flagged_out_of_scope_only") is not None else "")
            + ".</p>" + _scope_by_site(oos.get("by_site") or {}))


def _scope_by_site(by_site: dict[str, Any]) -> str:
    """Per site: how many of its OTHER lesions (and its malignant ones) were flagged; the rest were called NV
    without a flag."""
    if not by_site:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(site)}</td><td>{t['all']['n']}</td><td>{_share(t['all']['flagged'], t['all']['n'])}</td>"
        f"<td>{t['malignant']['n']}</td><td>{_share(t['malignant']['flagged'], t['malignant']['n'])}</td><td>"
        + ", ".join(f"{html.escape(d)} {_share(r['flagged'], r['n'], 2)}" for d, r in t["by_diagnosis"].items())
        + "</td></tr>" for site, t in by_site.items())
    return ("<h3>Out of scope per site (test)</h3><table><tr><th>site</th><th>OTHER lesions</th><th>flagged</th>"
            "<th>malignant (BCC, SCC, AK)</th><th>flagged</th><th>flagged per diagnosis</th></tr>" + body + "</table>")


_KEY_METRICS = (("AUC", "auc"), ("sensitivity", "mel_sensitivity"), ("specificity", "mel_specificity"),
                ("balanced accuracy", "balanced_accuracy"))


def _history_items(version: str, history: list[dict[str, Any]]) -> str:
    items = []
    for e in history:
        when = e["at"].isoformat(timespec="seconds") if hasattr(e["at"], "isoformat") else str(e["at"])
        who = f"by {html.escape(str(e['actor']))}: {html.escape(str(e['reason']))}"
        if e["model_version"] == version:
            what = ("<b class=\"fail\">MANUAL OVERRIDE</b>: made champion" if e["event"] == "override"
                    else "promoted to champion by the gate")
            items.append(f"<li>{when} {what} (previous champion {html.escape(str(e['previous']))}) {who}</li>")
        else:
            how = "a manual override" if e["event"] == "override" else "the gate"
            items.append(f"<li>{when} replaced as champion by {html.escape(e['model_version'])} through {how} {who}</li>")
    return "".join(items)


def gate_section(version: ModelVersion, history: list[dict[str, Any]] | None = None) -> str:
    """The report's gate section: decision, whether the version is the champion, every reason, the
    champion it was compared with (version, its test metrics, the paired deltas) and the champion_history
    events naming the version (manual overrides marked)."""
    gate, history = version.gate or {}, history or []
    overridden = any(e["model_version"] == version.model_version and e["event"] == "override" for e in history)
    if "passed" not in gate:
        title = '<span class="pending">not decided yet</span> (the gate runs after evaluation)'
    else:
        verdict = ('<span class="pass">PASSED</span>' if gate["passed"] else '<span class="fail">NOT PASSED</span>')
        promoted = any(e["model_version"] == version.model_version for e in history) or version.is_champion
        outcome = ("promoted by manual override" if overridden else "promoted") if promoted else "not promoted"
        title = f"{verdict}, {outcome}; now {html.escape(str(version.status))}"
    if gate.get("identical_to"):  # a no-op (assess.gate_model): nothing was compared, nothing refused
        title = f"identical to the champion {html.escape(str(gate['identical_to']))}: not promoted, nothing would change"
    parts = [f"<h2>Gate: {title}</h2>"] + [f"<p>{html.escape(r)}</p>" for r in gate.get("reasons", [])
                                           if gate.get("identical_to")]
    if gate.get("decided_at"):
        parts.append(f"<p>Decided {html.escape(str(gate['decided_at']))}.</p>")
    parts.append("<ul>" + "".join(f'<li class="{c.outcome}">{html.escape(c.line)}</li>'
                                  for c in Decision.from_json(gate).checks) + "</ul>")
    comparison = gate.get("comparison")
    if comparison:
        champ = gate.get("champion_metrics") or {}
        recorded = ", ".join(f"{name} {_cell(champ.get(key))}" for name, key in _KEY_METRICS)
        parts.append(f"<p>Compared with the champion {html.escape(comparison['champion'])} (its recorded test metrics: "
                     f"{recorded}, threshold {_cell(champ.get('threshold'))}) on the same {comparison.get('n_test')} "
                     f"test images: AUC delta {_cell(comparison.get('auc_delta'))}, sensitivity delta "
                     f"{_cell(comparison.get('mel_sensitivity_delta'))}.</p>")
    elif "passed" in gate and not gate.get("identical_to"):
        parts.append("<p>There was no champion to compare with.</p>")
    if history:
        parts.append("<h3>Champion history of this version</h3><ul>"
                     + _history_items(version.model_version, history) + "</ul>")
    return GATE_BEGIN + "".join(parts) + GATE_END


def with_gate(report: bytes, section: str) -> bytes:
    """`report` with its gate section replaced by `section` (a report from before the markers: its old
    "Gate:" heading and list; else inserted after the title)."""
    text = report.decode()
    if GATE_BEGIN in text and GATE_END in text:
        start, end = text.index(GATE_BEGIN), text.index(GATE_END) + len(GATE_END)
        return (text[:start] + section + text[end:]).encode()
    legacy = re.search(r"<h2>Gate: .*?</ul>", text, re.S)
    if legacy:
        return (text[:legacy.start()] + section + text[legacy.end():]).encode()
    head = text.index("</h1>") + len("</h1>") if "</h1>" in text else 0
    return (text[:head] + section + text[head:]).encode()


def threshold_sentence(version: ModelVersion, metrics: dict[str, Any]) -> str:
    """How the pooled threshold was chosen, in words: which target set it (the pooled validation split's, or a
    gated site's stricter one) and the validation sensitivity it reaches, not just the configured target."""
    t = metrics["test"]["threshold"]
    setter = version.review_rule.setter(t)
    configured = version.target_sensitivity
    val_sens = metrics["val"].get("mel_sensitivity")
    where = ("each site at its own threshold where it has one" if metrics["val"].get("thresholds_applied") == "per site"
             else "at this threshold")
    reached = f"; validation sensitivity {val_sens:.3f} ({where})" if isinstance(val_sens, (int, float)) else ""
    if setter is None or setter == "pooled":
        how = f"the pooled validation split's target (sensitivity {configured}, raised where its melanomas need a margin)"
    else:
        how = (f"the stricter target of site {html.escape(setter)} (its validation melanomas, sensitivity {configured} "
               "or higher for their margin), which the pooled threshold must also reach")
    return f"Threshold {t:.4f}, chosen on validation: set by {how}{reached}."


def html_report(version: ModelVersion, metrics: dict[str, Any], figures: dict[str, bytes],
                examples: list[dict[str, Any]], history: list[dict[str, Any]] | None = None) -> bytes:
    """A single HTML file, images embedded, nothing fetched from anywhere."""
    test = metrics["test"]
    ci = test.get("ci95", {})

    def row(name: str, key: str) -> str:
        interval = f" ({ci[key][0]:.3f} – {ci[key][1]:.3f})" if key in ci else ""
        return f"<tr><td>{name}</td><td>{_cell(test.get(key))}{interval}</td><td>{_cell(metrics['val'].get(key))}</td></tr>"

    cards = "".join(
        f'<figure>{_img(e["png"], e["image_id"])}<figcaption>{html.escape(e["image_id"])}: true {e["true"]}, '
        f'p(MEL) {e["p_mel"]:.2f}, {"right" if e["right"] else "WRONG"}, '
        f'{"no lesion segmented" if e.get("on_lesion") is None else format(e["on_lesion"], ".0%") + " on the lesion"}'
        f'</figcaption></figure>' for e in examples)
    figs = "".join(f"<figure>{_img(png, name)}<figcaption>{html.escape(name)}</figcaption></figure>" for name, png in figures.items())
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>Model {html.escape(version.model_version)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px}} figure{{display:inline-block;margin:6px;vertical-align:top}}
img{{max-width:330px}} .fail{{color:#b00}} .pass{{color:#070}} .pending{{color:#a60}} .note{{color:#555}} pre{{background:#f6f6f6;padding:8px}}</style></head><body>
<h1>Model version {html.escape(version.model_version)}</h1>
<p>Profile <b>{html.escape(version.profile)}</b>, backbone <b>{html.escape(version.backbone)}</b>, input {version.image_size} px,
weights: {html.escape(version.weights_source or '')}. {threshold_sentence(version, metrics)} MC-dropout samples {version.mc_samples}.</p>
{gate_section(version, history)}
<h2>Metrics (test n={test['n']}, {test['n_mel']} melanoma; 95% bootstrap intervals)</h2>
<table><tr><th>metric</th><th>test</th><th>validation</th></tr>
{row('AUC', 'auc')}{row('melanoma sensitivity', 'mel_sensitivity')}{row('melanoma specificity', 'mel_specificity')}
{row('balanced accuracy', 'balanced_accuracy')}{row('average precision', 'average_precision')}
{row('ECE', 'ece')}{row('Brier', 'brier')}{row('NLL', 'nll')}</table>
<p>MC-dropout entropy: right cases {test['entropy_right_mean']:.3f}, wrong cases {test['entropy_wrong_mean']:.3f}
(AUC of entropy for spotting errors {test['uncertainty_auc_for_errors']:.3f}).</p>
<pre>{html.escape(test['classification_report'])}</pre>
{_site_table(metrics, version.thresholds_by_site)}
{_scope_table(metrics)}
<p>Calibration (Platt scaling of the MC-dropout samples, fitted on validation): test ECE
{test.get('uncalibrated', {}).get('ece', float('nan')):.3f} before, {test['ece']:.3f} after.</p>
{figs}
<h2>Grad-CAM examples (right and wrong)</h2>{cards}
{attention_table(test.get('attention'))}
<h2>Lineage and environment</h2><pre>{html.escape(json.dumps({'lineage': version.lineage, 'environment': version.environment, 'config': version.config}, indent=1, default=str))}</pre>
</body></html>"""
    return body.encode()
