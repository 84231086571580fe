"""The review UI's charts as inline SVG (no JavaScript, no external files): the MC-dropout histogram of
a case, and per night the distributions of p(MEL) and entropy and the queue's size."""

from __future__ import annotations

from typing import Any


def histogram_svg(values: list[float], marks: dict[str, float], bins: int = 20, width: int = 420, height: int = 160) -> str:
    """Histogram of values in [0, 1] with labelled vertical marks (e.g. the threshold, the mean)."""
    counts = [0] * bins
    for v in values:
        counts[min(int(v * bins), bins - 1)] += 1
    top = max(counts) or 1
    pad, plot_h = 24, height - 40
    bar_w = (width - 2 * pad) / bins
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="MC distribution of p(MEL)">']
    for i, c in enumerate(counts):
        h = plot_h * c / top
        parts.append(f'<rect x="{pad + i * bar_w:.1f}" y="{10 + plot_h - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                     f'fill="#5b7db1"><title>{i / bins:.2f}–{(i + 1) / bins:.2f}: {c}</title></rect>')
    parts.append(f'<line x1="{pad}" y1="{10 + plot_h}" x2="{width - pad}" y2="{10 + plot_h}" stroke="#333"/>')
    for x in (0, 0.5, 1):
        parts.append(f'<text x="{pad + x * (width - 2 * pad):.1f}" y="{height - 12}" font-size="11" text-anchor="middle">{x:g}</text>')
    for k, (name, x) in enumerate(marks.items()):
        px = pad + min(max(x, 0), 1) * (width - 2 * pad)
        color = ("#c0392b", "#222", "#888")[k % 3]
        right = x > 0.6  # label on the left of marks near 1, so it stays inside the chart
        parts.append(f'<line x1="{px:.1f}" y1="8" x2="{px:.1f}" y2="{10 + plot_h}" stroke="{color}" stroke-dasharray="4 3"/>'
                     f'<text x="{px + (-3 if right else 3):.1f}" y="{18 + 12 * k}" font-size="11" fill="{color}" '
                     f'text-anchor="{"end" if right else "start"}">{name} {x:.3f}</text>')
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
