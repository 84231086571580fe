from __future__ import annotations

from pathlib import Path

import pytest

from lesion_tasks.settings import Settings, db_url_from_connection, s3_overrides_from_connection


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


def test_connection_fields_to_urls():
    assert db_url_from_connection("postgres", "db", 5432, "lesion", "p@ss", "lesion", {}) == \
        "postgresql+psycopg2://lesion:p%40ss@db:5432/lesion"
    assert db_url_from_connection("anything", None, None, None, None, None, {"sqlalchemy_url": "sqlite:///a.db"}) == "sqlite:///a.db"
    with pytest.raises(ValueError, match="lesion_db connection type 'mysql'"):
        db_url_from_connection("mysql", "h", None, None, None, None)
    o = s3_overrides_from_connection("minio", 9000, "ak", "sk", {"store_url": "s3://lesion"})
    assert o == {"s3_endpoint": "http://minio:9000", "s3_access_key": "ak", "s3_secret_key": "sk", "store_url": "s3://lesion"}
    assert s3_overrides_from_connection(None, None, "ak", "sk", {"endpoint_url": "https://s3.example"})["s3_endpoint"] == "https://s3.example"
