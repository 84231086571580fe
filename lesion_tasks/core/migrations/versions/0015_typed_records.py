"""Typed records in `model_versions`: a gate decision's checks and the review rule's keys.

- `gate.checks`: each stored gate line ("PASS: ...", "FAIL: ...", "NOTE ...") becomes a check {"outcome",
  "kind", "text", "where", "figures"}; readers read the checks, never the words (`assessment.gate.Decision`).
  This frozen conversion is the only place the words are parsed, once, for decisions stored before.
- `review_rule.threshold_by_source` (each validation target's threshold, one letter away from
  `thresholds_by_site`, the applied thresholds) is renamed `threshold_by_target`; `p_mel_band` and
  `calibrated_on`, written and never read, go.
No column changes: views and grants stay as they are. Downgrade puts the old key back and drops the checks.

Revision ID: 0015_typed_records
Revises: 0014_views_decision_columns
Create Date: 2026-12-05
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0015_typed_records"
down_revision = "0014_views_decision_columns"
branch_labels = None
depends_on = None

_versions = sa.table("model_versions", sa.column("model_version", sa.String), sa.column("gate", sa.JSON),
                     sa.column("review_rule", sa.JSON))


def _check(line: str) -> dict:
    for outcome in ("PASS", "FAIL", "NOTE"):
        if line.startswith(outcome):
            text = line[len(outcome):].lstrip(":").strip()
            return {"outcome": outcome.lower(), "kind": "recorded", "text": text, "where": "", "figures": {}}
    return {"outcome": "note", "kind": "recorded", "text": line, "where": "", "figures": {}}


def _rows(conn) -> list:
    return conn.execute(sa.select(_versions.c.model_version, _versions.c.gate, _versions.c.review_rule)).all()


def _load(value):
    return json.loads(value) if isinstance(value, str) else value


def upgrade() -> None:
    conn = op.get_bind()
    for version, gate, rule in _rows(conn):
        gate, rule = _load(gate), _load(rule)
        values = {}
        if gate and "checks" not in gate:
            values["gate"] = gate | {"checks": [_check(str(r)) for r in gate.get("reasons") or []]}
        if rule and ("threshold_by_source" in rule or "p_mel_band" in rule or "calibrated_on" in rule):
            new = {k: v for k, v in rule.items() if k not in ("threshold_by_source", "p_mel_band", "calibrated_on")}
            new["threshold_by_target"] = rule.get("threshold_by_source") or {}
            values["review_rule"] = new
        if values:
            conn.execute(_versions.update().where(_versions.c.model_version == version).values(**values))


def downgrade() -> None:
    conn = op.get_bind()
    for version, gate, rule in _rows(conn):
        gate, rule = _load(gate), _load(rule)
        values = {}
        if gate and "checks" in gate:
            values["gate"] = {k: v for k, v in gate.items() if k != "checks"}
        if rule and "threshold_by_target" in rule:
            values["review_rule"] = ({k: v for k, v in rule.items() if k != "threshold_by_target"}
                                     | {"threshold_by_source": rule["threshold_by_target"]})
        if values:
            conn.execute(_versions.update().where(_versions.c.model_version == version).values(**values))
