"""Portable references: the database stores object keys relative to the configured store.

Until 0005 every `*_uri` column held an absolute URI (`file:///home/.../store/drops/...`,
`s3://bucket/prefix/...`), so a home copied to another path, or a bucket restored under another name
or prefix, could no longer find its own objects. Upgrade rewrites each absolute URI to its key,
found by the part of the layout that names the row (`/drops/<drop_id>/`, `/models/<version>/`,
`/predictions/<version>/`), so it works whatever store the rows were written under. `drops.source`
(a drop taken from `incoming/` in the store) becomes relative when it lies under the configured store;
a local folder or zip stays an absolute file URI. Downgrade writes absolute URIs of the configured
store again (it needs that store URL: run it through `lesion_tasks.core.db.downgrade(settings, ...)`).

Revision ID: 0006_portable_refs
Revises: 0005_reviews
Create Date: 2026-11-26
"""

from urllib.parse import quote, unquote

import sqlalchemy as sa
from alembic import context, op

revision = "0006_portable_refs"
down_revision = "0005_reviews"
branch_labels = None
depends_on = None

BATCH = 5000
# (table, reference column, key columns, the marker that starts the key, from the row)
COLUMNS = [
    ("images", "original_uri", ("image_id",), lambda r: f"/drops/{r['drop_id']}/", ("drop_id",)),
    ("images", "normalized_uri", ("image_id",), lambda r: f"/drops/{r['drop_id']}/", ("drop_id",)),
    ("quarantine", "raw_uri", ("id",), lambda r: f"/drops/{r['drop_id']}/quarantine/", ("drop_id",)),
    ("drops", "manifest_uri", ("drop_id",), lambda r: f"/drops/{r['drop_id']}/", ()),
    ("model_versions", "model_uri", ("model_version",), lambda r: f"/models/{r['model_version']}/", ()),
    ("model_versions", "report_uri", ("model_version",), lambda r: f"/models/{r['model_version']}/", ()),
    ("model_versions", "metrics_uri", ("model_version",), lambda r: f"/models/{r['model_version']}/", ()),
    ("predictions", "gradcam_uri", ("image_id", "model_version"), lambda r: f"/predictions/{r['model_version']}/", ()),
]


def _store_base() -> str | None:
    from lesion_tasks.core.store import base_uri

    url = context.config.attributes.get("store_url")
    return base_uri(url) if url else None


def _rewrite(table: str, column: str, key_cols: tuple, new_value, extra: tuple = (), where: str = "") -> int:
    """Apply `new_value(row) -> str | None` to every row's `column` (None: leave it), in batches."""
    bind = op.get_bind()
    cols = list(dict.fromkeys((*key_cols, *extra, column)))
    rows = bind.execute(sa.text(f"SELECT {', '.join(cols)} FROM {table} WHERE {column} IS NOT NULL {where}")).mappings().all()
    updates = []
    for row in rows:
        value = new_value(row)
        if value is not None and value != row[column]:
            updates.append({**{k: row[k] for k in key_cols}, "_v": value})
    match = " AND ".join(f"{k} = :{k}" for k in key_cols)
    for start in range(0, len(updates), BATCH):
        bind.execute(sa.text(f"UPDATE {table} SET {column} = :_v WHERE {match}"), updates[start : start + BATCH])
    return len(updates)


def _relative(uri: str, marker: str) -> str | None:
    """The key inside an absolute URI: from the last occurrence of `marker` on (None: not found)."""
    if "://" not in uri:
        return None  # already a key
    at = uri.rfind(marker)
    return unquote(uri[at + 1 :]) if at >= 0 else None


def upgrade() -> None:
    base = _store_base()
    for table, column, key_cols, marker, extra in COLUMNS:
        _rewrite(table, column, key_cols, lambda r, c=column, m=marker: _relative(r[c], m(r)), extra,
                 f"AND {column} LIKE '%://%'")
    if base:  # drops taken from the store: relative too (their `source` is how discovery knows them)
        prefix = base.rstrip("/") + "/"
        _rewrite("drops", "source", ("drop_id",),
                 lambda r: unquote(r["source"][len(prefix):]) if r["source"].startswith(prefix) else None)
        _rewrite("quarantine", "raw_uri", ("id",),
                 lambda r: unquote(r["raw_uri"][len(prefix):]) if r["raw_uri"].startswith(prefix) else None)


def downgrade() -> None:
    base = _store_base()
    if base is None:
        raise RuntimeError("downgrading 0006 writes absolute URIs of the configured store: run it with the store URL "
                           "(lesion_tasks.core.db.downgrade(settings, revision))")
    quoted = base.startswith("file:")

    def absolute(value: str) -> str | None:
        if "://" in value:
            return None
        return f"{base.rstrip('/')}/{quote(value) if quoted else value}"

    for table, column, key_cols, _marker, _extra in COLUMNS:
        _rewrite(table, column, key_cols, lambda r, c=column: absolute(r[c]))
    _rewrite("drops", "source", ("drop_id",), lambda r: absolute(r["source"]))
