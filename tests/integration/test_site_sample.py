"""A site's validation sample keeps inclusion probabilities of one draw (probe finding 6): two draws of one site
at once (a 60-image sample kept 30 rows with the probabilities of a 30-image one), an extension after a new
champion (rows of two models' strata: sum of 1/pi 44.2 for 40 images), and `lesion check` seeing either."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import sqlalchemy as sa

from lesion_tasks.core import db
from lesion_tasks.core.schema import images, model_versions, predictions, site_samples
from lesion_tasks.core.settings import Settings
from lesion_tasks.ops import consistency
from lesion_tasks.sites import sample
from tests import reliability
from tests.helpers import wait_for_lock_waiters
from tests.unit.test_label_import import add_images

SITE = "clinic-sample"
IDS = [f"ISIC_S{i:03d}" for i in range(100)]


def _home(tmp_path, url: str) -> Settings:
    settings = Settings.from_env({"LESION_HOME": str(tmp_path / "home")}, db_url=url)
    db.upgrade(settings)
    add_images(settings, IDS)
    with db.make_engine(settings.db_url).begin() as conn:
        conn.execute(images.update().values(site=SITE))
    return settings


def _champion(settings: Settings, version: str, p_mel: dict[str, float]) -> None:
    """`version` the champion (the one before retired), with these scores of the site's images."""
    now = datetime.now(UTC)
    engine = db.make_engine(settings.db_url)
    with engine.begin() as conn:
        conn.execute(model_versions.update().values(is_champion=False, status="retired"))
        conn.execute(model_versions.insert().values(
            model_version=version, created_at=now, status="champion", profile="demo", backbone="tiny", image_size=32,
            threshold=0.5, mc_samples=0, config={}, environment={}, weights_source="none", lineage={},
            code_version="test", run_id=version, is_champion=True))
        conn.execute(predictions.insert(), [
            {"image_id": i, "model_version": version, "p_mel": p, "predicted_label": "MEL" if p >= 0.5 else "NV",
             "threshold": 0.5, "entropy": 0.0, "mutual_info": 0.0, "mc_samples": 0, "needs_review": False,
             "drop_id": "d", "run_id": version, "scored_at": now} for i, p in p_mel.items()])
    engine.dispose()


def _rows(settings: Settings) -> list:
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(site_samples).order_by(site_samples.c.rank)).all()
        problems = sample.consistency(conn)
    engine.dispose()
    return rows, problems


def _expected(p_mel: dict[str, float], n: int) -> dict[str, tuple[str, float]]:
    """(stratum, pi) of every image of the site under `p_mel`'s size measure and a sample of n."""
    weights, strata = sample.size_measure(p_mel, IDS)
    c = sample.scale(weights, n)
    return {i: (s, float(min(1.0, c * w))) for i, w, s in zip(IDS, weights, strata)}


def test_two_draws_of_a_site_at_once_take_turns_and_keep_one_draws_probabilities(pg_url, tmp_path):
    """The test holds the site's sampling lock while a draw of 60 and a draw of 30 start; both wait for it, and
    once it is released the sample is one draw of 60: every row's probability that of a 60-image sample."""
    settings = _home(tmp_path, pg_url)
    p_mel = {i: (k * 37 % 100) / 100 for k, i in enumerate(IDS)}
    _champion(settings, "v-a", p_mel)
    engine = db.make_engine(settings.db_url)
    results: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, sample.draw(settings, SITE, n)))
               for n in (60, 30)]
    with engine.begin() as holder:
        db.take_turns(holder, f"site-sample:{SITE}")
        for t in threads:
            t.start()
        wait_for_lock_waiters(engine, 2, threads, "the draws")
        assert _rows(settings)[0] == []  # nothing drawn while the lock is held
    for t in threads:
        t.join(120)
    engine.dispose()
    rows, problems = _rows(settings)
    expected = _expected(p_mel, 60)
    wrong = [r.image_id for r in rows if (r.stratum, r.inclusion_probability) != expected[r.image_id]]
    reliability.record("Two draws of one site's validation sample at once",
                       "draws of 60 and 30 started while a third transaction held the site's sampling lock (PostgreSQL)",
                       "they take turns; every row's probability that of one 60-image draw; `lesion check` agrees",
                       f"{len(rows)} rows, {len(wrong)} with another draw's probability; check: {len(problems)} problems",
                       0, 0)
    assert len(rows) == 60 and [r.rank for r in rows] == list(range(60)) and not wrong and problems == []
    assert [r["image_id"] for r in results[30]["images"]] == [r.image_id for r in rows[:30]]


def test_extending_after_a_new_champion_gives_every_row_the_new_measure(pg_url, tmp_path):
    """40 rows drawn under champion A; B (which ranks the site the other way round) extends the sample to 60:
    every row, A's included, carries B's stratum and B's probability for a sample of 60, so the sum of 1/pi
    estimates the site's 100 images from one measure."""
    settings = _home(tmp_path, pg_url)
    p_a = {i: k / 100 for k, i in enumerate(IDS)}
    p_b = {i: 1 - k / 100 for k, i in enumerate(IDS)}
    _champion(settings, "v-a", p_a)
    sample.draw(settings, SITE, 40)
    _champion(settings, "v-b", p_b)
    sample.draw(settings, SITE, 60)
    rows, problems = _rows(settings)
    expected = _expected(p_b, 60)
    wrong = [r.image_id for r in rows if (r.stratum, r.inclusion_probability) != expected[r.image_id]]
    assert len(rows) == 60 and not wrong and problems == [], (wrong[:5], problems)
    reliability.record("A validation sample extended after a new champion",
                       "40 images drawn under one champion, extended to 60 under another that ranks the site the other way",
                       "every row under the new champion's size measure and n", f"{len(wrong)} of {len(rows)} rows under another measure",
                       0, 0)


def test_lesion_check_reports_a_sample_of_two_draws(pg_url, tmp_path):
    """The state the probe left (a sample of 60 whose first 30 rows kept the probabilities of a sample of 30) is
    a problem of `lesion check`; a consistent sample is not."""
    settings = _home(tmp_path, pg_url)
    p_mel = {i: (k * 37 % 100) / 100 for k, i in enumerate(IDS)}
    _champion(settings, "v-a", p_mel)
    sample.draw(settings, SITE, 60)
    assert consistency.check(settings)["problems"]["inconsistent_site_sample"] == 0
    small = _expected(p_mel, 30)
    engine = db.make_engine(settings.db_url)
    with engine.begin() as conn:
        for r in conn.execute(sa.select(site_samples.c.image_id).where(site_samples.c.rank < 30)).all():
            conn.execute(site_samples.update().where(site_samples.c.image_id == r.image_id)
                         .values(inclusion_probability=small[r.image_id][1]))
    engine.dispose()
    report = consistency.check(settings)
    assert report["problems"]["inconsistent_site_sample"] == 1 and not report["ok"]
    assert report["examples"]["inconsistent_site_sample"][0]["site"] == SITE
