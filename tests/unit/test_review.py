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


# --- the queue's default order and the site filter (issue 37, item 3) ---------------------------

# image_id: (site, ISIC label, p_mel, decision_uncertainty, review_reasons, reviewed); threshold 0.1, all flagged
PLANTED = {
    "ISIC_7000001": ("clinic-a", None, 0.90, 0.0, "predicted_mel", False),               # likely melanoma
    "ISIC_7000002": ("clinic-a", None, 0.60, 0.40, "predicted_mel,uncertain", False),    # likely, though unsure
    "ISIC_7000003": ("clinic-a", None, 0.30, 0.45, "predicted_mel,uncertain", False),    # unsure
    "ISIC_7000004": ("clinic-a", None, 0.12, 0.35, "predicted_mel,uncertain,near_threshold", False),
    "ISIC_7000005": ("clinic-a", None, 0.45, 0.0, "predicted_mel", False),               # the rest, by p_mel
    "ISIC_7000006": ("clinic-a", None, 0.20, 0.05, "predicted_mel", False),
    "ISIC_7000007": ("clinic-a", None, 0.95, 0.0, "predicted_mel", True),                # reviewed: not in the queue
    "ISIC_7000008": ("clinic-a", None, 0.05, 0.0, "out_of_scope", False),
    "ISIC_7000009": ("clinic-b", None, 0.70, 0.0, "predicted_mel", False),
    "ISIC_7000010": ("clinic-b", None, 0.15, 0.50, "predicted_mel,uncertain", False),
    "ISIC_7000011": ("isic", "MEL", 0.99, 0.0, "predicted_mel", False),                  # ISIC-labelled: after the rest
    "ISIC_7000012": ("isic", "NV", 0.20, 0.30, "predicted_mel,uncertain", False),
}
# likely melanomas by p_mel, then the unsure by decision_uncertainty, then the rest by p_mel; labelled ones last
PRIORITY = ["ISIC_7000001", "ISIC_7000009", "ISIC_7000002", "ISIC_7000010", "ISIC_7000003", "ISIC_7000004",
            "ISIC_7000005", "ISIC_7000006", "ISIC_7000008", "ISIC_7000011", "ISIC_7000012"]


def _planted_home(tmp_path):
    from datetime import UTC, datetime

    import sqlalchemy as sa

    from lesion_tasks.core import db
    from lesion_tasks.core.schema import drops, images, model_versions, predictions, reviews
    from lesion_tasks.core.settings import Settings

    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")})
    db.upgrade(settings)
    engine, now = db.make_engine(settings.db_url), datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(drops.insert(), [{"drop_id": site, "source": site, "layout": "l", "fingerprint": "0" * 64, "site": site,
                                       "status": "complete", "n_entries": 1, "started_at": now}
                                      for site in ("clinic-a", "clinic-b", "isic")])
        conn.execute(model_versions.insert(), [{
            "model_version": "m1", "created_at": now, "status": "champion", "profile": "demo", "backbone": "tiny",
            "image_size": 64, "threshold": 0.1, "mc_samples": 20, "config": {}, "environment": {}, "weights_source": "none",
            "lineage": {}, "code_version": "t", "run_id": "r", "is_champion": True}])
        for i, (site, label, p, du, reasons, reviewed) in PLANTED.items():
            conn.execute(images.insert(), [{
                "image_id": i, "drop_id": site, "source_entry": i, "sha256": i.ljust(64, "0"), "label": label,
                "near_dup_group": i, "phash": "0" * 16, "width": 1, "height": 1, "n_bytes": 1, "format": "JPEG",
                "original_uri": "o", "normalized_uri": "n", "normalized_size": 1, "ingested_at": now, "site": site}])
            conn.execute(predictions.insert(), [{
                "image_id": i, "model_version": "m1", "p_mel": p, "predicted_label": "MEL" if p >= 0.1 else "NV",
                "threshold": 0.1, "entropy": 0.5, "mutual_info": 0.01, "mc_samples": 20, "gradcam_uri": "g",
                "needs_review": True, "review_reasons": reasons, "decision_uncertainty": du, "drop_id": site,
                "run_id": "r", "scored_at": now}])
            if reviewed:
                conn.execute(reviews.insert(), [{
                    "submission_id": f"s-{i}", "image_id": i, "model_version": "m1", "verdict": "agree", "label": "MEL",
                    "reviewer": "dr", "reviewed_at": now, "p_mel": p, "predicted_label": "MEL"}])
    return settings, engine, sa


def test_default_order_puts_likely_melanomas_first_then_unsure_decisions_and_the_view_ranks_the_same(tmp_path):
    """The queue's default order (issue 37, item 3): unlabelled images first; likely melanomas (p_mel >= 0.5) by
    p_mel, then the decisions flagged uncertain by the share of MC samples across the threshold, then the rest by
    p_mel; `v_review_queue.queue_rank` is that order (1 = first) over the open cases, NULL once reviewed. The old
    default (`decision`) stays a choice and puts the most unsure first."""
    from lesion_tasks.review import cases
    from tests import reliability

    _, engine, sa = _planted_home(tmp_path)
    with engine.connect() as conn:
        default = [c["image_id"] for c in cases.queue(conn, cases.QueueFilter())["cases"]]
        page = [c["image_id"] for c in cases.queue(conn, cases.QueueFilter(labelled=cases.DEFAULT_LABELLED))["cases"]]
        decision = [c["image_id"] for c in cases.queue(conn, cases.QueueFilter(sort="decision"))["cases"]]
        ranked = conn.execute(sa.text("SELECT image_id, queue_rank FROM v_review_queue")).all()
    engine.dispose()
    assert default == PRIORITY
    assert page == [i for i in PRIORITY if PLANTED[i][1] is None]  # the UI's default page: unlabelled only
    assert decision[:2] == ["ISIC_7000010", "ISIC_7000003"]  # the most unsure decision first, as before
    ranks = dict(ranked)
    assert ranks.pop("ISIC_7000007") is None  # reviewed: out of the queue
    assert sorted(ranks, key=ranks.get) == PRIORITY and sorted(ranks.values()) == list(range(1, len(PRIORITY) + 1))
    assert [i for i in sorted(ranks, key=ranks.get) if PLANTED[i][1] is None] == page == PRIORITY[:len(page)]
    reliability.record("Review queue's first page holds nevi while the sure melanomas come last",
                       "a planted queue: 3 likely melanomas, 4 unsure decisions, 3 others, 2 ISIC-labelled, 1 reviewed",
                       "likely melanomas first, then unsure decisions, then the rest; SQL's queue_rank the same order",
                       f"first three rows p(MEL) {[PLANTED[i][2] for i in default[:3]]}; queue_rank order equal to "
                       f"the UI's: {sorted(ranks, key=ranks.get) == default}", 0, 0)


def test_site_filter_and_the_order_control_say_what_they_do(tmp_path):
    """The queue narrows to one site (as stored), offers the sites present, refuses a malformed one naming it,
    and labels its order control by what each order does."""
    import re

    import pytest
    from fastapi.testclient import TestClient

    from lesion_tasks.review import cases
    from lesion_tasks.review.web import Reviewer, create_app

    settings, engine, _ = _planted_home(tmp_path)
    with engine.connect() as conn:
        only_b = cases.queue(conn, cases.QueueFilter(site="clinic-b"))
        assert [c["image_id"] for c in only_b["cases"]] == ["ISIC_7000009", "ISIC_7000010"] and only_b["total"] == 2
        assert cases.queue(conn, cases.QueueFilter(site="Clinic-B"))["total"] == 0  # matched as stored
        assert cases.choices(conn)["sites"] == ["clinic-a", "clinic-b", "isic"]
    engine.dispose()
    with pytest.raises(ValueError, match=r"site='a\\x00b': expected a site's name as stored"):
        cases.QueueFilter(site="a\x00b")
    with pytest.raises(ValueError, match="site='xxx"):
        cases.QueueFilter(site="x" * 129)

    async def anyone(_request):
        return Reviewer("dr", True, True)

    client = TestClient(create_app(lambda: settings, anyone, lambda nxt: "/login"))
    page = client.get("/").text
    assert re.findall(r'<tr data-image-id="([^"]+)">', page) == [i for i in PRIORITY if PLANTED[i][1] is None]
    assert "Most uncertain first by" not in page and ">Order" in page
    assert ('<option value="priority" selected>likely melanomas first (p(MEL) ≥ 0.5), then unsure decisions, '
            'then the rest</option>') in page
    assert '<option value="decision" >most uncertain decision first</option>' in page
    assert '<option value="clinic-b" >clinic-b</option>' in page
    shown = client.get("/", params={"site": "clinic-b"}).text
    assert re.findall(r'<tr data-image-id="([^"]+)">', shown) == ["ISIC_7000009", "ISIC_7000010"]
    assert '<option value="clinic-b" selected>clinic-b</option>' in shown and ", site clinic-b)" in shown
    assert client.get("/", params={"site": "x" * 200}).status_code == 400
