"""The pure parts of test_review.py (no trained home, no training): see tests/integration/test_review.py for the rest."""

from __future__ import annotations





def test_mc_chart_labels_never_print_over_each_other():
    """The case page's MC chart: a threshold and a mean close together get label rows of their own, above the
    bars; far apart they share one; a mark near 1 keeps its label inside the chart."""
    import re

    from lesion_tasks.review.charts import histogram_svg, mark_labels

    def overlap(a, b):
        return a["row"] == b["row"] and a["x0"] < b["x1"] and b["x0"] < a["x1"]

    close = mark_labels({"threshold": 0.115, "mean": 0.118}, 420, 24)
    assert not overlap(*close) and {p["row"] for p in close} == {0, 1}
    apart = mark_labels({"threshold": 0.1, "mean": 0.95}, 420, 24)
    assert [p["row"] for p in apart] == [0, 0] and apart[1]["anchor"] == "end" and apart[1]["x1"] <= 420
    svg = histogram_svg([0.1, 0.12, 0.13, 0.5], {"threshold": 0.115, "mean": 0.118})
    label_ys = [float(y) for y in re.findall(r'<text class="mark" x="[0-9.]+" y="([0-9.]+)"', svg)]
    bar_tops = [float(y) for y in re.findall(r'<rect x="[0-9.]+" y="([0-9.]+)"', svg)]
    assert len(label_ys) == 2 and len(set(label_ys)) == 2 and max(label_ys) < min(bar_tops)
