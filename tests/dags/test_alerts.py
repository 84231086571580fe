"""Alerts through Airflow's SMTP notifier, mailed to a local SMTP sink (aiosmtpd on 127.0.0.1) by the DAGs
run with `dag.test()` on the embedded defaults: a gate refusal (lesion_retrain), a nightly run without a
champion, a night whose predictions shifted, and a failed nightly run. Each message carries the model
version, the numbers and a link to the Airflow run (and, with a model, its report). Without the Connection
`lesion_alerts_smtp` alerts are off, said once, and nothing fails. Also: the shift rule on numbers, and what
`isic_ingest` says when it finds no new drop."""

from __future__ import annotations

import dataclasses
import email
import html
import json
import logging
import re
import sys
from datetime import UTC, datetime, timedelta
from email import policy
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import sqlalchemy as sa

from lesion_tasks.model.config import PROFILES
from lesion_tasks.ops import alerts
from lesion_tasks.core import db, keys
from lesion_tasks.ingest.drop import ingest
from lesion_tasks.ingest.sources import survey_incoming
from lesion_tasks.versions.registry import GateFloors
from lesion_tasks.core.schema import drops, model_versions, site_evaluations
from lesion_tasks.core.store import open_store
from lesion_tasks.ops.synthetic import make_drop
from tools import servers
from tests.helpers import copy_home, run_dag

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
TINY = {"profile": "demo", "backbone": "tiny", "image_size": 64, "weights": "none", "epochs": 60, "seed": 0,
        "mc_samples": 20, "target_sensitivity": 0.85}


class _Sink:
    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        message = email.message_from_bytes(envelope.content, policy=policy.default)
        message["X-Rcpt-To"] = ",".join(envelope.rcpt_tos)
        self.messages.append(message)
        return "250 Message accepted for delivery"

    def texts(self) -> list[str]:
        """Subject and body of every message, HTML unescaped."""
        out = []
        for m in self.messages:
            body = m.get_body(("html", "plain"))
            out.append(f"{m['Subject']}\n{html.unescape(body.get_content() if body else '')}")
        return out


@pytest.fixture
def smtp_sink(monkeypatch):
    """A local SMTP server and the Connection `lesion_alerts_smtp` pointing at it (alerts on)."""
    from aiosmtpd.controller import Controller

    sink, port = _Sink(), servers.free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    # aiosmtpd logs from its own thread, also while stopping, when pytest's capture stream may be closed
    monkeypatch.setattr(logging.getLogger("mail.log"), "disabled", True)
    controller.start()
    monkeypatch.setenv("AIRFLOW_CONN_LESION_ALERTS_SMTP", json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": port,
        "extra": {"from_email": "lesion@example.org", "to": "oncall@example.org, ml@example.org",
                  "disable_ssl": True, "disable_tls": True, "timeout": 10, "retry_limit": 0}}))
    yield sink
    controller.stop()


def _home(monkeypatch, home) -> None:
    """dag.test() on the embedded home `home`: no lesion Connections, drops taken at once."""
    for name in ("AIRFLOW_CONN_LESION_DB", "AIRFLOW_CONN_LESION_S3", "LESION_DB_URL", "LESION_STORE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LESION_HOME", str(home))
    monkeypatch.setenv("LESION_INCOMING_SETTLE_SECONDS", "0")


def _dag(dag_id: str):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS)).get_dag(dag_id)


def _run_link(dag_id: str, run_id: str) -> str:
    return f"/dags/{dag_id}/runs/{quote(run_id, safe='')}"


def test_shift_rule_on_numbers():
    rng = np.random.default_rng(0)
    before = {"p_mel": rng.beta(2, 5, 2000), "entropy": rng.uniform(0, 0.69, 2000)}
    same = {"p_mel": rng.beta(2, 5, 300), "entropy": rng.uniform(0, 0.69, 300)}
    result = alerts.compare_nights(same, before)
    assert not result["shifted"] and result["p_mel"]["ks"] < alerts.KS_BOUND
    moved = {"p_mel": rng.beta(5, 2, 300), "entropy": same["entropy"]}
    result = alerts.compare_nights(moved, before)
    assert result["shifted"] and result["p_mel"]["shifted"] and not result["entropy"]["shifted"]
    assert result["p_mel"]["ks"] > 0.5 and result["p_mel"]["delta"] > 0.3
    few = alerts.compare_nights({k: v[:alerts.MIN_TONIGHT - 1] for k, v in moved.items()}, before)
    assert not few["shifted"] and "not compared" in few["note"]


def test_alerts_are_off_without_the_connection(monkeypatch):
    sys.path.insert(0, str(REPO / "plugins"))
    import lesion_airflow

    monkeypatch.delenv("AIRFLOW_CONN_LESION_ALERTS_SMTP", raising=False)
    monkeypatch.setattr(lesion_airflow, "_said_alerts_off", False)
    # what the plugin's logger is asked to say, whatever handlers earlier tests (Airflow's logging) left
    said: list[str] = []
    monkeypatch.setattr(lesion_airflow.log, "info", lambda msg, *args, **kwargs: said.append(msg % args))
    alert = alerts.nightly_empty("run-1", {"Airflow run": "http://x/dags/d/runs/run-1"})
    assert lesion_airflow.send_alert({}, alert) is False
    assert lesion_airflow.send_alert({}, alert) is False
    said = [line for line in said if "alerts are off" in line]
    assert len(said) == 1 and "lesion_alerts_smtp" in said[0]


def test_incoming_report_says_what_was_seen(local_settings):
    store, now = open_store(local_settings), datetime.now(UTC)
    engine = db.make_engine(local_settings.db_url)
    with engine.begin() as conn:
        for name, source in (("night-1", "incoming/night-1"), ("night-2", "incoming/night-2.zip")):
            conn.execute(drops.insert().values(drop_id=name, source=source, layout="isic-cli", fingerprint="f" * 64,
                                               status="complete", n_entries=1, started_at=now - timedelta(hours=1)))
    engine.dispose()
    for key in ("incoming/night-1/ISIC_1.jpg", "incoming/night-2.zip", "incoming/night-3/ISIC_3.jpg", "incoming/notes.txt"):
        store.put(key, b"x")
    text = alerts.incoming_report(survey_incoming(dataclasses.replace(local_settings, incoming_settle_seconds=300)))
    assert re.match(r"no new drop under incoming/: 2 drop\(s\) already ingested \(night-1, night-2.zip\), 1 settling "
                    r"\(night-3 in (5 min 0|4 min 5\d) s, or at once with a _READY marker in the drop\), ", text), text
    assert text.endswith("1 loose file(s) ignored (notes.txt)"), text


def test_nightly_without_a_champion_is_skipped_and_mailed(embedded_airflow_env, smtp_sink):
    run, states = run_dag(_dag("lesion_nightly_score"))
    assert run.state == "success" and states == {"plan_shards": "skipped", "score_shard": "skipped",
                                                 "settle": "skipped", "summarise": "skipped"}, states
    [text] = smtp_sink.texts()
    assert "no champion model: train one with lesion_retrain" in text and "Model version: none" in text
    assert _run_link("lesion_nightly_score", run.run_id) in text
    assert smtp_sink.messages[0]["X-Rcpt-To"] == "oncall@example.org,ml@example.org"


def test_gate_refusal_is_a_skip_and_mailed(embedded_airflow_env, smtp_sink, tmp_path, monkeypatch):
    # a real gate, made to refuse: floors above any reachable AUC and balanced accuracy (dag.test runs the
    # tasks in this process, so the profile's floors are what the run records and the gate applies)
    monkeypatch.setitem(PROFILES, "demo", dataclasses.replace(
        PROFILES["demo"], floors=GateFloors(auc=1.01, balanced_accuracy=1.01)))
    # enough melanomas in test and validation for the gate to decide on its floors
    ingest(str(make_drop(tmp_path / "drop", n_images=450, seed=11, melanoma_fraction=0.5)), embedded_airflow_env)
    run, states = run_dag(_dag("lesion_retrain"), TINY)
    assert run.state == "success", states  # a refusal is not a failure ...
    assert states["gate_and_promote"] == "skipped" and states["collect_garbage"] == "success", states  # ... but shows
    engine = db.make_engine(embedded_airflow_env.db_url)
    with engine.connect() as conn:
        version, gate = conn.execute(sa.select(model_versions.c.model_version, model_versions.c.gate)).one()
    engine.dispose()
    [text] = smtp_sink.texts()
    assert f"model {version} NOT promoted" in text and "The champion stays: none" in text
    assert "FAIL: test auc" in text and "< floor 1.01" in text  # the numbers: value and floor
    assert all(reason in text for reason in gate["reasons"]), (gate["reasons"], text)  # every check, failed or passed
    assert _run_link("lesion_retrain", run.run_id) in text and f"/lesion-review/models/{quote(version, safe='')}/report" in text


def test_nightly_shift_and_failure_are_mailed(airflow_db, trained_home, smtp_sink, tmp_path, monkeypatch):
    home = copy_home(trained_home.settings, tmp_path / "home")  # scored once: the previous night
    _home(monkeypatch, home.home)
    version = trained_home.version
    # tonight: only melanomas (a referral clinic joined, say): p_mel moves far from the previous night's
    referrals = make_drop(tmp_path / "referrals", n_images=60, melanoma_fraction=1.0, seed=77, size=128)
    (referrals / "metadata.csv").unlink()  # a clinic's images, no labels: a site the model was never validated at
    ingest(str(referrals), home)
    dag = _dag("lesion_nightly_score")
    run, states = run_dag(dag)
    assert run.state == "success", states
    texts = smtp_sink.texts()
    assert len(texts) == 2, texts  # the shift, and a night that rests on a site the model was never validated at
    text = next(t for t in texts if "prediction shift" in t)
    night = next(t for t in texts if "come mostly from unvalidated sites" in t)
    assert "60 of 60 images tonight (100%)" in night and "referrals" in night and f"model version {version}" in night
    assert "Images by site status: unvalidated 60." in night
    assert "prediction shift tonight (p_mel" in text and f"Model version {version}" in text
    assert "n = 60" in text and "KS " in text and "SHIFTED" in text and "Bound: KS > 0.2 with p < 0.01" in text
    assert _run_link("lesion_nightly_score", run.run_id) in text and f"/lesion-review/models/{quote(version, safe='')}/report" in text

    # the clinic's labels arrived and put the champion below a floor there (its site_evaluations row: failing);
    # its next night: every case to review, and a mail that says so and why
    engine = db.make_engine(home.db_url)
    with engine.begin() as conn:
        conn.execute(site_evaluations.insert().values(
            model_version=version, site="referrals", status="failing", evidence="test", melanomas_evidence=35,
            threshold=0.5, chosen_on="site", evaluated_at=datetime.now(UTC),
            metrics={"n_mel": 35, "mel_sensitivity": 0.45, "ci95": {"mel_sensitivity": [0.30, 0.55]}}))
    engine.dispose()
    again = make_drop(tmp_path / "referrals-2", n_images=12, melanoma_fraction=1.0, seed=79, size=128)
    (again / "metadata.csv").unlink()
    ingest(str(again), home, site="referrals")
    run, states = run_dag(dag)
    assert run.state == "success", states
    texts = smtp_sink.texts()
    assert len(texts) == 3, texts[2:]  # 12 images: too few to compare for a shift; not unvalidated: failing
    assert "12 case(s) tonight from 1 site(s) where model" in texts[2] and "is below a floor: referrals" in texts[2]
    floor = trained_home.config.floors.mel_sensitivity  # the trained home's own floors (tests/helpers.py)
    assert f"mel_sensitivity 95% CI up to 0.550 < {floor}" in texts[2] and "Every one of them went to review" in texts[2]

    # a night whose scoring fails (the champion's artifacts are gone): one failure alert for the run
    ingest(str(make_drop(tmp_path / "more", n_images=8, seed=78, size=128)), home)
    store = open_store(home)
    for info in list(store.list(keys.model_prefix(version))):
        store.delete(info.key)
    for t in dag.tasks:
        t.retries = 0  # no retry delay to wait out in dag.test
    run, states = run_dag(dag)
    assert run.state == "failed" and states["score_shard"] == "failed", states
    assert len(smtp_sink.messages) == 4
    text = smtp_sink.texts()[3]
    assert f"nightly scoring FAILED (model {version})" in text and "score_shard[0]" in text
    assert _run_link("lesion_nightly_score", run.run_id) in text
