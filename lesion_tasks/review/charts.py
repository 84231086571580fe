"""The review UI's charts as inline SVG (no JavaScript, no external files): the MC-dropout histogram of
a case, and per night the distributions of p(MEL) and entropy and the queue's size."""

from __future__ import annotations

from typing import Any

LABEL_CHAR_W = 6.5  # px per character of an 11 px sans-serif label: an upper bound, so boxes never understate
LABEL_ROW_H = 13


def mark_labels(marks: dict[str, float], width: int, pad: int) -> list[dict[str, Any]]:
    """Where each mark's label goes: beside its line (right of it, or left where it would leave the chart),
    in the first row above the plot where it overlaps no label already placed. Marks close together (a
    threshold and a mean 0.005 apart) get rows of their own instead of printing over each other."""
    placed: list[dict[str, Any]] = []
    for k, (name, x) in sorted(enumerate(marks.items()), key=lambda kv: kv[1][1]):
        px = pad + min(max(x, 0), 1) * (width - 2 * pad)
        text = f"{name} {x:.3f}"
        w = len(text) * LABEL_CHAR_W
        right = px + 3 + w > width - 2
        x0, x1 = (px - 3 - w, px - 3) if right else (px + 3, px + 3 + w)
        row = 0
        while any(p["row"] == row and x0 < p["x1"] + 4 and p["x0"] < x1 + 4 for p in placed):
            row += 1
        placed.append({"k": k, "name": name, "value": x, "px": px, "text": text, "x0": x0, "x1": x1, "row": row,
                       "anchor": "end" if right else "start"})
    return sorted(placed, key=lambda p: p["k"])


def histogram_svg(values: list[float], marks: dict[str, float], bins: int = 20, width: int = 420, height: int = 160) -> str:
    """Histogram of values in [0, 1] with labelled vertical marks (e.g. the threshold, the mean); the labels
    sit in rows above the bars (`mark_labels`), never over each other."""
    counts = [0] * bins
    for v in values:
        counts[min(int(v * bins), bins - 1)] += 1
    top = max(counts) or 1
    pad = 24
    labels = mark_labels(marks, width, pad)
    plot_top = 6 + LABEL_ROW_H * (1 + max((p["row"] for p in labels), default=-1))
    plot_h = height - 30 - plot_top
    bar_w = (width - 2 * pad) / bins
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="MC distribution of p(MEL)">']
    for i, c in enumerate(counts):
        h = plot_h * c / top
        parts.append(f'<rect x="{pad + i * bar_w:.1f}" y="{plot_top + plot_h - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                     f'fill="#5b7db1"><title>{i / bins:.2f}–{(i + 1) / bins:.2f}: {c}</title></rect>')
    parts.append(f'<line x1="{pad}" y1="{plot_top + plot_h}" x2="{width - pad}" y2="{plot_top + plot_h}" stroke="#333"/>')
    for x in (0, 0.5, 1):
        parts.append(f'<text x="{pad + x * (width - 2 * pad):.1f}" y="{height - 12}" font-size="11" text-anchor="middle">{x:g}</text>')
    for p in labels:
        color = ("#c0392b", "#222", "#888")[p["k"] % 3]
        y = 4 + LABEL_ROW_H * (p["row"] + 1) - 3
        parts.append(f'<line x1="{p["px"]:.1f}" y1="{y - 9}" x2="{p["px"]:.1f}" y2="{plot_top + plot_h}" stroke="{color}" '
                     f'stroke-dasharray="4 3"/><text class="mark" x="{p["x1"] if p["anchor"] == "end" else p["x0"]:.1f}" '
                     f'y="{y}" font-size="11" fill="{color}" text-anchor="{p["anchor"]}">{p["text"]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _heat(frac: float) -> str:
    shade = int(255 - 200 * min(max(frac, 0.0), 1.0))
    return f"rgb({shade},{shade},255)"


def nights_svg(data: dict[str, Any], key: str, top: float, label: str, width: int = 520) -> str:
    """One row per night: the distribution of `key` as a heat strip (darker = more images)."""
    nights, bins = data["nights"], data["bins"]
    row_h, left, head = 18, 90, 22
    height = head + row_h * max(len(nights), 1) + 22
    cell = (width - left - 24) / bins
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{label} per night">',
             f'<text x="{left}" y="14" font-size="12">{label} (0 to {top:.2f}), share of the night\'s images</text>']
    for r, night in enumerate(nights):
        counts, total = night[key], max(sum(night[key]), 1)
        y = head + r * row_h
        parts.append(f'<text x="{left - 6}" y="{y + 13}" font-size="11" text-anchor="end">{night["night"]}</text>')
        for i, c in enumerate(counts):
            parts.append(f'<rect x="{left + i * cell:.1f}" y="{y}" width="{cell - 1:.1f}" height="{row_h - 2}" fill="{_heat(c / total)}">'
                         f'<title>{night["night"]}: {c} of {total} in [{i * top / bins:.2f}, {(i + 1) * top / bins:.2f})</title></rect>')
    y = head + row_h * max(len(nights), 1) + 14
    for x in (0, 0.5, 1):
        parts.append(f'<text x="{left + x * (width - left - 24):.1f}" y="{y}" font-size="11" text-anchor="middle">{x * top:.2f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def queue_bars_svg(data: dict[str, Any], width: int = 640) -> str:
    """Per night: images scored, cases flagged for review, verdicts recorded."""
    nights = data["nights"]
    row_h, left, head = 18, 90, 22
    height = head + row_h * max(len(nights), 1) + 8
    top = max([n["scored"] for n in nights] + [1])
    scale = (width - left - 230) / top
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="review queue size per night">',
             f'<text x="{left}" y="14" font-size="12">grey: scored · red: flagged for review · green: verdicts</text>']
    for r, n in enumerate(nights):
        y = head + r * row_h
        parts.append(f'<text x="{left - 6}" y="{y + 13}" font-size="11" text-anchor="end">{n["night"]}</text>'
                     f'<rect x="{left}" y="{y}" width="{n["scored"] * scale:.1f}" height="{row_h - 2}" fill="#ddd"/>'
                     f'<rect x="{left}" y="{y + 3}" width="{n["flagged"] * scale:.1f}" height="{row_h - 8}" fill="#c0392b"/>'
                     f'<rect x="{left}" y="{y + 6}" width="{n["reviewed"] * scale:.1f}" height="{row_h - 14}" fill="#27ae60"/>'
                     f'<text x="{left + n["scored"] * scale + 6:.1f}" y="{y + 13}" font-size="11">'
                     f'{n["flagged"]} flagged of {n["scored"]}, {n["reviewed"]} reviewed</text>')
    parts.append("</svg>")
    return "".join(parts)
