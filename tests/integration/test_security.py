"""Secrets stay out of the repository and the logs; wrong credentials are refused; links handed to
people expire."""

from __future__ import annotations

import re
import subprocess
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import sqlalchemy as sa

from lesion_tasks.core import db, keys
from lesion_tasks.scoring import overlays
from lesion_tasks.core.schema import images, predictions
from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import S3Store, StoreError, key_of, open_store
from lesion_tasks.ops.synthetic import make_drop
from tests import reliability
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[2]
# credentials of the throwaway servers the tests start: not secrets
TEST_CREDENTIALS = {"lesiontestaccess", "lesiontestsecret-0123456789", "lesion-rest-test-password",
                    "secret", "hunter2", "p%40ss", "s3cr3t-value", "pg-password-that-must-not-leak"}  # fakes in tests
SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"-----BEGIN (?:RSA |EC |OPENSSH |DSA )?PRIVATE KEY-----"),
    re.compile(r"(?i)(?:password|passwd|secret|token|secret_key)[\"']?\s*[:=]\s*[\"']([^\"'\s]{8,})[\"']"),  # quoted literals
    re.compile(r"(?m)^[A-Z_]*(?:PASSWORD|SECRET|TOKEN)[A-Z_]*=(\S{8,})$"),  # .env style
    re.compile(r"://[^/\s:@]+:([^@\s${}]{6,})@"),  # credentials inside URLs
]


def test_no_secret_in_tracked_files():
    # the scanner itself catches the usual shapes
    # (assembled at run time so that this file does not trip its own scan)
    for leak in ("password = " + '"Sup3r' + 'S3cretValue"', "AWS_SECRET_ACCESS_KEY" + "=abcd1234efgh5678",
                 "postgresql://u:" + "realpass99@db/x", "AKIA" + "ABCDEFGHIJKLMNOP"):
        assert any(p.search(leak) for p in SECRET_PATTERNS), leak
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    findings = []
    for name in files:
        path = REPO / name
        if not path.is_file() or path.suffix in {".png", ".jpg", ".h5", ".keras"}:
            continue
        text = path.read_text(errors="ignore")
        for pattern in SECRET_PATTERNS:
            for match in pattern.finditer(text):
                value = match.group(match.lastindex or 0)
                if value in TEST_CREDENTIALS or value.startswith(("change-me", "$", "<")) or "{" in value:
                    continue
                findings.append(f"{name}: {match.group(0)[:60]}")
    assert findings == []
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_credentials_never_in_logs_or_output(tmp_path, s3_settings_kwargs, pg_url):
    secret = s3_settings_kwargs["s3_secret_key"]
    password = "pg-password-that-must-not-leak"
    url = pg_url.replace("postgres@", f"postgres:{password}@")  # trust auth ignores it; the logs must too
    env = {"LESION_HOME": str(tmp_path / "home"), "LESION_DB_URL": url, "LESION_STORE_URL": s3_settings_kwargs["store_url"],
           "LESION_S3_ENDPOINT": s3_settings_kwargs["s3_endpoint"], "LESION_S3_ACCESS_KEY": s3_settings_kwargs["s3_access_key"],
           "LESION_S3_SECRET_KEY": secret}
    drop = make_drop(tmp_path / "drop", n_images=8, seed=61)
    outputs = [run_cli("-v", "db", "upgrade", env=env), run_cli("-v", "ingest", str(drop), "--json", env=env),
               run_cli("-v", "score", env=env)]  # no champion: a clear error, which must not leak either
    text = "".join(o.stdout + o.stderr for o in outputs)
    assert outputs[1].returncode == 0, outputs[1].stderr[-2000:]
    assert secret not in text and password not in text
    reliability.record("Credentials in logs", "CLI runs with -v, S3 secret and a DB password set",
                       "neither appears in stdout/stderr", "absent from 3 runs' output", 0, 0)


def test_wrong_s3_credentials_are_refused(s3_server):
    with pytest.raises(StoreError, match="refused access"):
        S3Store("any-bucket", "", s3_server.endpoint, s3_server.access_key, "wrong-secret-0123456789")
    reliability.record("Wrong object-store credentials", "S3Store opened with a wrong secret key",
                       "refused with a clear error", "StoreError 'refused access'", 0, 0)


def test_gradcam_links_are_presigned_and_expire(trained_home, s3_settings_kwargs, monkeypatch):
    """A Grad-CAM link handed to a person works, names its lifetime, and is refused once that is over;
    the bucket itself stays private. Expiry is checked without waiting: a link signed ten minutes ago
    for 2 s is refused, one signed then for an hour still works (so the refusal is the expiry)."""
    from minio import time as minio_time

    shared = trained_home.settings  # its database is only read; one overlay goes to a fresh bucket
    settings = Settings.from_env({"LESION_HOME": str(shared.home)}, db_url=shared.db_url, **s3_settings_kwargs)
    engine = db.make_engine(shared.db_url)
    with engine.connect() as conn:
        image_id, ref, original = conn.execute(
            sa.select(predictions.c.image_id, predictions.c.gradcam_uri, images.c.original_uri)
            .join(images, images.c.image_id == predictions.c.image_id).order_by(predictions.c.image_id).limit(1)).one()
    engine.dispose()
    local, bucket = open_store(shared), open_store(settings)
    for key in (key_of(local, ref), key_of(local, original)):  # the stored map and the original it is drawn on
        bucket.put(key, local.get(key))

    url = overlays.gradcam_link(settings, image_id, expires_s=2)
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["2"]
    anonymous = requests.get(url.split("?", 1)[0], timeout=10)  # the same object without the signature
    assert anonymous.status_code != 200 and not anonymous.content.startswith(b"\x89PNG")  # the bucket is private
    fresh = requests.get(overlays.gradcam_link(settings, image_id, expires_s=600), timeout=10)
    assert fresh.status_code == 200 and fresh.content.startswith(b"\x89PNG")
    # drawn from the map once, kept beside it
    assert bucket.get(keys.overlay_of_map(key_of(local, ref))) == fresh.content
    signed_at = minio_time.utcnow() - timedelta(minutes=10)
    monkeypatch.setattr(minio_time, "utcnow", lambda: signed_at)
    expired = overlays.gradcam_link(settings, image_id, expires_s=2)
    still_valid = overlays.gradcam_link(settings, image_id, expires_s=3600)
    monkeypatch.undo()
    assert requests.get(expired, timeout=10).status_code in (400, 401, 403)
    assert requests.get(still_valid, timeout=10).status_code == 200
    with pytest.raises(ValueError, match="expires=0: expected 1 to 604800 seconds"):
        overlays.gradcam_link(settings, image_id, expires_s=0)
    reliability.record("Grad-CAM links handed to people", "presigned GET with a 2 s lifetime, fetched in time and "
                       "(signed 10 minutes earlier) after it", "works, then refused; unsigned access refused",
                       "200 then refused; unsigned refused", 0, 0)


def test_a_post_without_origin_is_exempt_only_with_a_bearer_token(home_copy):
    """The review form's cross-site check is skipped for API clients, which send no Origin, but only those with
    a bearer token: a browser behind a Basic-auth proxy resends `Authorization: Basic ...` by itself, cross-site
    too (`Origin: null` from a sandboxed frame), whereas it never adds a bearer token (a script's would need
    CORS). Both posts carry a valid session (the app's login says who)."""
    import base64

    from fastapi.testclient import TestClient

    from lesion_tasks.core.schema import reviews
    from lesion_tasks.review import cases
    from lesion_tasks.review.web import Reviewer, create_app

    async def authenticate(request):
        return Reviewer("dr-session", True, True)

    client = TestClient(create_app(lambda: home_copy, authenticate, lambda nxt: f"/login?next={nxt}"))
    engine = db.make_engine(home_copy.db_url)
    with engine.connect() as conn:
        first, second = cases.queue(conn, cases.QueueFilter(status="all", limit=2))["cases"]
    basic = "Basic " + base64.b64encode(b"dr-session:hunter2").decode()

    def post(case: dict, submission_id: str, authorization: str):
        return client.post(f"/case/{case['image_id']}/review", follow_redirects=False,
                           headers={"Origin": "null", "Authorization": authorization},
                           data={"model_version": case["model_version"], "verdict": "agree", "submission_id": submission_id})

    refused = [post(first, "basic-000001", basic), post(first, "basic-000002", basic.lower())]
    accepted = post(second, "bearer-00001", "bEaReR an-api-token")  # the scheme is case-insensitive
    with engine.connect() as conn:
        written = dict(conn.execute(sa.select(reviews.c.submission_id, sa.func.count()).group_by(reviews.c.submission_id)
                                    .where(reviews.c.submission_id.in_(["basic-000001", "basic-000002", "bearer-00001"]))).all())
    engine.dispose()
    assert [(r.status_code, r.text) for r in refused] == [(403, '{"detail":"cross-site form post refused"}')] * 2
    assert accepted.status_code == 303, accepted.text
    assert written == {"bearer-00001": 1}
    basic_rows = written.get("basic-000001", 0) + written.get("basic-000002", 0)
    reliability.record("Cross-site verdict post carrying a proxy's Basic credentials", "form post with a valid session, "
                       "Origin: null and Authorization: Basic … (as a browser behind a Basic-auth proxy resends)",
                       "refused, nothing written; a bearer token still exempts API clients",
                       f"{refused[0].status_code} 'cross-site form post refused', {basic_rows} rows; a bearer post "
                       f"{accepted.status_code}, {written['bearer-00001']} row", 0, 0)
