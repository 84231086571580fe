"""One contract, two object stores: a local directory and S3 (the minio SDK against a real server)."""

from __future__ import annotations

import io

import pytest

from lesion_tasks.core.settings import Settings
from lesion_tasks.core.store import LocalStore, ObjectNotFound, S3Store, base_uri, check_key, key_of, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    kwargs = request.getfixturevalue("s3_settings_kwargs")
    return open_store(Settings.from_env({"LESION_HOME": str(tmp_path)}, **kwargs))


def test_put_get_roundtrip_and_references(store):
    """put returns the key (what the database stores); key_of reads a key or this store's absolute URI."""
    ref = store.put("drops/d1/original/ISIC_1.jpg", b"\xff\xd8bytes", "image/jpeg")
    assert ref == "drops/d1/original/ISIC_1.jpg"
    assert store.get(key_of(store, ref)) == b"\xff\xd8bytes"
    uri = store.uri(ref)
    assert uri.startswith(store.url) and key_of(store, uri) == ref
    assert base_uri(store.url) == store.url
    with pytest.raises(ValueError, match="not in store"):
        key_of(store, "s3://elsewhere/drops/d1/original/ISIC_1.jpg")
    with pytest.raises(ValueError, match="relative path"):
        key_of(store, "../etc/passwd")


def test_overwrite_is_whole(store):
    store.put("k/a", b"first version, longer")
    store.put("k/a", b"second")
    assert store.get("k/a") == b"second"


def test_missing_key(store):
    with pytest.raises(ObjectNotFound):
        store.get("nope/missing")
    with pytest.raises(ObjectNotFound):
        store.download("nope/missing", io.BytesIO())
    assert not store.exists("nope/missing")
    store.delete("nope/missing")  # absent: not an error


def test_list_is_sorted_and_prefix_scoped(store):
    for key in ["incoming/b/2.jpg", "incoming/a/1.jpg", "incoming/a.zip", "drops/x/1.jpg"]:
        store.put(key, b"x" * 3)
    listed = [o.key for o in store.list("incoming/")]
    assert listed == ["incoming/a.zip", "incoming/a/1.jpg", "incoming/b/2.jpg"]
    assert all(o.size == 3 for o in store.list("incoming/"))
    assert [o.key for o in store.list("incoming/a/")] == ["incoming/a/1.jpg"]
    assert len(list(store.list())) == 4


def test_download_streams(store):
    data = bytes(range(256)) * 5000
    store.put("big/blob", data)
    out = io.BytesIO()
    store.download("big/blob", out)
    assert out.getvalue() == data


def test_delete(store):
    store.put("d/x", b"1")
    store.delete("d/x")
    assert not store.exists("d/x")


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "a//b", "a\\b", "./a", "a/."])
def test_bad_keys_rejected(store, bad):
    with pytest.raises(ValueError, match="object key"):
        store.put(bad, b"x")
    with pytest.raises(ValueError):
        check_key(bad)


def test_local_store_leaves_no_temp_files(tmp_path):
    store = LocalStore(tmp_path / "s")
    for i in range(5):
        store.put("a/b", str(i).encode())
    assert sorted(p.name for p in (tmp_path / "s" / "a").iterdir()) == ["b"]


def test_open_store_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="LESION_S3_ENDPOINT"):
        open_store(Settings.from_env({"LESION_HOME": str(tmp_path), "LESION_STORE_URL": "s3://bucket"}))
    with pytest.raises(ValueError, match="expected file:///dir or s3://"):
        open_store(Settings.from_env({"LESION_HOME": str(tmp_path), "LESION_STORE_URL": "ftp://x"}))


def test_s3_store_with_prefix_keeps_keys_relative(s3_server):
    store = S3Store("prefixed", "team/a", s3_server.endpoint, s3_server.access_key, s3_server.secret_key)
    store.put("incoming/x.zip", b"z")
    assert [o.key for o in store.list("incoming/")] == ["incoming/x.zip"]
    assert store.uri("incoming/x.zip") == "s3://prefixed/team/a/incoming/x.zip"
