"""What an empty page of the review UI says, and why: no champion yet (how many versions were trained and
why the last one was not promoted), or an empty queue / label check (what each filter hides, with the links
that show it, or that the champion has scored nothing yet)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from lesion_tasks.assessment.gate import Decision
from lesion_tasks.review.cases import QueueFilter
from lesion_tasks.versions import registry


def no_champion(conn: sa.Connection) -> dict[str, Any]:
    """What a page says while there is no champion ({"versions": trained, "text"}): how many model versions
    were trained and why the last one was not promoted (the gate's first failed check), or how to train one."""
    rows = registry.versions(conn)
    trained = [row for row in rows if row.status != "training"]
    training = f" ({len(rows) - len(trained)} training now)" if len(rows) > len(trained) else ""
    if not trained:
        return {"versions": 0, "text": f"No model version trained yet{training}: trigger the lesion_retrain DAG (Airflow: "
                "DAGs, lesion_retrain, Trigger) or run `lesion train`; nightly scoring (lesion_nightly_score) then scores "
                "the images with the champion."}
    last, gate = trained[0], trained[0].gate or {}
    fails = [c.text for c in Decision.from_json(gate).failed]
    if gate.get("passed") is False or last.status == "rejected":
        more = f" (and {len(fails) - 1} more)" if len(fails) > 1 else ""
        why = f"was refused by the gate: {fails[0] if fails else 'no reason recorded'}{more}"
    elif gate.get("passed"):
        why = "passed the gate but is not the champion: promote it (`lesion promote`)"
    elif last.status == "retired":
        why = "was retired and nothing replaced it"
    else:
        why = "has not been through the gate yet (lesion_retrain's gate_and_promote)"
    n = len(trained)
    return {"versions": n, "text": f"{n} model version{'s' if n != 1 else ''} trained{training}, none promoted: "
                                  f"the last one, {last.model_version}, {why}."}


def empty_hints(f: QueueFilter, result: dict[str, Any], check: bool = False) -> dict[str, Any]:
    """Why a page of the queue (`check`: of the label check) is empty: a headline, and per filter what it
    hides with the links that show it ({"text", "links": [{"text", "path", "params"}]}; params None = drop
    that parameter; path "" is the queue, "label-check" the label check)."""
    c, version = result["counts"], result["model_version"]
    where = f" in split {f.split}" if f.split else ""
    if check:
        head = f"0 labelled images{where} where model {version} contradicts ISIC ({f.status})"
    else:
        noun = {"unlabelled": "unlabelled cases", "labelled": "labelled cases", "all": "cases"}[f.labelled]
        head = {"open": f"0 {noun}{where} need review", "reviewed": f"0 reviewed {noun}{where}",
                "all": f"0 flagged {noun}{where}"}[f.status]
    hints: list[dict[str, Any]] = []

    def hint(text: str, *links: tuple[str, str, dict[str, Any]]) -> None:
        hints.append({"text": text, "links": [{"text": t, "path": path, "params": params} for t, path, params in links]})

    def are(n: int, noun: str) -> str:
        return f"{n} {noun}{'s are' if n != 1 else ' is'}"

    if not check and f.labelled != "all":
        other = "labelled" if f.labelled == "unlabelled" else "unlabelled"
        if n := c["labelled"][other]:
            if other == "labelled":
                hint(f"{are(n, 'labelled image')} flagged (ISIC labelled them: a verdict cannot make them training labels)",
                     ("see Label check", "label-check", {"labelled": None}), ("show them", "", {"labelled": "labelled"}))
            else:
                hint(f"{are(n, 'unlabelled case')} flagged", ("show them", "", {"labelled": "unlabelled"}))
    if f.split and (n := c["split"]["all"] - c["split"][f.split]):
        hint(f"{are(n, 'case')} in other splits", ("show every split", "", {"split": None}))
    if f.status != "all":
        other = "reviewed" if f.status == "open" else "open"
        if n := c["status"][other]:
            hint(f"{are(n, 'case')} {'already reviewed' if other == 'reviewed' else 'still open'}",
                 (f"show {other}", "", {"status": other}))
    narrowing = [f"{name} {value}" for name, value in (("drop", f.drop_id), ("site", f.site), ("predicted label", f.label),
                                                       ("flag", f.flag)) if value]
    if narrowing:
        hint(f"the filters {', '.join(narrowing)} may hide more",
             ("clear them", "", {"drop": None, "site": None, "label": None, "flag": None}))
    if not hints and result.get("scored") == 0:
        hint(f"model {version} has not scored any image yet: lesion_nightly_score scores every unscored image "
             "(or `lesion score`)")
    elif not hints:
        hint(f"model {version} agrees with every ISIC label it scored" if check else f"model {version} flagged nothing for review")
    return {"headline": head, "hints": hints}
