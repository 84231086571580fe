from __future__ import annotations

from pathlib import Path

import pytest

from lesion_tasks.core.settings import Settings, db_url_from_connection, s3_overrides_from_connection
from tests import reliability


def test_embedded_defaults_live_under_home(tmp_path):
    s = Settings.from_env({"LESION_HOME": str(tmp_path)})
    assert s.db_url == f"sqlite:///{tmp_path / 'lesion.db'}"
    assert s.store_url == (tmp_path / "store").as_uri()
    assert s.image_size == 224


def test_environment_and_overrides():
    env = {"LESION_HOME": "/x", "LESION_DB_URL": "postgresql://u:secret@h/db", "LESION_STORE_URL": "s3://b/p",
           "LESION_S3_ENDPOINT": "http://h:9000", "LESION_S3_ACCESS_KEY": "ak", "LESION_S3_SECRET_KEY": "sk",
           "LESION_IMAGE_SIZE": "96"}
    s = Settings.from_env(env, db_url="sqlite:///over.db", s3_endpoint=None)
    assert s.home == Path("/x") and s.db_url == "sqlite:///over.db" and s.s3_endpoint == "http://h:9000"
    assert s.image_size == 96


def test_secrets_never_in_repr_or_describe():
    s = Settings.from_env({"LESION_HOME": "/x", "LESION_DB_URL": "postgresql://u:hunter2@h/db",
                           "LESION_S3_ACCESS_KEY": "AKIAXYZ", "LESION_S3_SECRET_KEY": "s3cr3t-value"})
    text = repr(s) + repr(s.describe())
    assert "s3cr3t-value" not in text and "hunter2" not in text
    assert "AKIAXYZ" not in repr(s.describe())


@pytest.mark.parametrize("value", ["abc", "8"])
def test_bad_integer_names_variable(value):
    with pytest.raises(ValueError, match=f"LESION_IMAGE_SIZE={value!r}|LESION_IMAGE_SIZE={value}"):
        Settings.from_env({"LESION_HOME": "/x", "LESION_IMAGE_SIZE": value})


def test_overlays_are_drawn_on_demand_unless_materialised():
    assert Settings.from_env({}).gradcam_materialize is False
    assert Settings.from_env({"LESION_GRADCAM_MATERIALIZE": "1"}).gradcam_materialize is True
    with pytest.raises(ValueError, match="LESION_GRADCAM_MATERIALIZE='png': expected 0 or 1"):
        Settings.from_env({"LESION_GRADCAM_MATERIALIZE": "png"})


def test_verdicts_validate_is_off_unless_set_to_one():
    assert Settings.from_env({}).verdicts_validate is False  # the stated default: verdicts only train
    assert Settings.from_env({"LESION_VERDICTS_VALIDATE": "1"}).verdicts_validate is True
    assert Settings.from_env({"LESION_VERDICTS_VALIDATE": "0"}).verdicts_validate is False
    with pytest.raises(ValueError, match="LESION_VERDICTS_VALIDATE='yes': expected 0 or 1"):
        Settings.from_env({"LESION_VERDICTS_VALIDATE": "yes"})


def test_connection_fields_to_urls():
    assert db_url_from_connection("postgres", "db", 5432, "lesion", "p@ss", "lesion", {}) == \
        "postgresql+psycopg2://lesion:p%40ss@db:5432/lesion"
    assert db_url_from_connection("anything", None, None, None, None, None, {"sqlalchemy_url": "sqlite:///a.db"}) == "sqlite:///a.db"
    with pytest.raises(ValueError, match="lesion_db connection type 'mysql'"):
        db_url_from_connection("mysql", "h", None, None, None, None)
    o = s3_overrides_from_connection("minio", 9000, "ak", "sk", {"store_url": "s3://lesion"})
    assert o == {"s3_endpoint": "http://minio:9000", "s3_access_key": "ak", "s3_secret_key": "sk", "store_url": "s3://lesion"}
    assert s3_overrides_from_connection(None, None, "ak", "sk", {"endpoint_url": "https://s3.example"})["s3_endpoint"] == "https://s3.example"


@pytest.mark.parametrize("url, secrets", [
    ("postgresql+psycopg2://lesion@db:5432/lesion?password=hunter2", ["hunter2"]),
    ("postgresql://lesion:hunter2@db/lesion?sslmode=require&sslpassword=keypass1", ["hunter2", "keypass1"]),
    ("postgresql://db/lesion?user=u&PassWord=Hunter2&application_name=x", ["Hunter2"]),
    ("postgresql://db/lesion?pwd=p1&passwd=p2&secret=p3&token=p4&api_key=p5&X-Auth-Token=p6", ["p1", "p2", "p3", "p4", "p5", "p6"]),
    ("postgresql://db/lesion?password=a%40b%26c", ["a%40b%26c", "a@b&c"]),
    # SQLAlchemy reads the password up to the '@', '?' and '/' included
    ("postgresql://u:p?s/w@db/lesion", ["p?s/w", "?s/w"]),
    ("postgresql://me@corp:hunter2@db/lesion", ["hunter2"]),  # SQLAlchemy: user 'me@corp', password 'hunter2'
    ("postgresql://u:@db/lesion", []),
])
def test_password_in_query_or_userinfo_is_masked(url, secrets):
    s = Settings.from_env({"LESION_HOME": "/x", "LESION_DB_URL": url})
    shown = s.describe()["db_url"]
    for secret in secrets:
        assert secret not in shown and secret not in repr(s)
    assert shown.startswith("postgresql") and "db" in shown
    if "sslmode=require" in url:
        assert "sslmode=require" in shown  # other parameters stay readable
    if "application_name=x" in url:
        assert "user=u" in shown and "application_name=x" in shown


def test_db_upgrade_output_masks_query_password(tmp_path, monkeypatch, capsys):
    from lesion_tasks import cli
    from lesion_tasks.core import db

    url = "postgresql+psycopg2://lesion@db:5432/lesion?sslmode=require&password=hunter2"
    monkeypatch.setenv("LESION_HOME", str(tmp_path))
    monkeypatch.setenv("LESION_DB_URL", url)
    seen = []
    monkeypatch.setattr(db, "upgrade", lambda settings: seen.append(settings.db_url) or "0007")
    for argv in (["db", "upgrade"], ["--json", "db", "upgrade"]):
        assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert seen == [url, url]  # the real URL is used, only the output is masked
    assert "hunter2" not in out and "password=***" in out and "sslmode=require" in out
    reliability.record("A password in a database URL's query string", "...?password=hunter2 in LESION_DB_URL; "
                       "`lesion db upgrade` with and without --json", "masked in every output", "password=*** shown", 0, 0)
