"""The `lesion` command line. Every command prints a human summary, or one JSON object with --json."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lesion_tasks.core.settings import Settings

log = logging.getLogger("lesion")


def _emit(args: argparse.Namespace, payload: dict[str, Any], human: str) -> None:
    if args.json:
        print(json.dumps(payload, sort_keys=True, default=str))
    else:
        print(human)


def _cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from lesion_tasks.core import db

    revision = db.upgrade(settings)
    _emit(args, {"revision": revision, "db_url": settings.describe()["db_url"]},
          f"database {settings.describe()['db_url']} is at revision {revision}")
    return 0


def _ingest_summary(result: dict[str, Any]) -> str:
    lines = [f"drop {result['drop_id']} ({result['layout']}) from {result['source']}, site {result['site']}",
             f"  accepted {result['accepted']}  quarantined {result['quarantined']}  duplicates {result['duplicates']}"]
    if result["labels"]:
        lines.append("  labels   " + "  ".join(f"{k} {v}" for k, v in result["labels"].items()))
    if result["reasons"]:
        lines.append("  reasons  " + "  ".join(f"{k} {v}" for k, v in result["reasons"].items()))
    if result["already_ingested"]:
        lines.append(f"  {result['already_ingested']} entries were already recorded by an earlier run: nothing new for them")
    t = result["totals"]
    lines.append(f"  drop totals: accepted {t['accepted']}  quarantined {t['quarantined']}  duplicates {t['duplicates']}")
    return "\n".join(lines)


def _cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from lesion_tasks.core import db
    from lesion_tasks.ingest.drop import ingest

    db.upgrade(settings)
    result = ingest(args.source, settings, drop_id=args.drop_id, site=args.site).as_json()
    _emit(args, result, _ingest_summary(result))
    return 0


def _cmd_sites(args: argparse.Namespace, settings: Settings) -> int:
    from lesion_tasks.core import db

    db.upgrade(settings)
    if getattr(args, "sites_command", None) == "sample":
        from lesion_tasks.sites import sample as site_sample

        result = sample_site(settings, args.site, args.size)
        _emit(args, result, site_sample.summary(result))
        return 0
    from lesion_tasks.sites import status as sites

    result = sites.overview(settings)
    _emit(args, result, sites.summary(result))
    return 0


def sample_site(settings: Settings, site: str, size: int = 200) -> dict[str, Any]:
    """`lesion sites sample`: SITE's validation sample, its images scored by the champion first where needed."""
    from lesion_tasks.scoring import nightly
    from lesion_tasks.sites import sample as site_sample

    return site_sample.draw(settings, site, size, lambda version, name: nightly.score(settings, version, site=name))


def _cmd_labels_import(args: argparse.Namespace, settings: Settings) -> int:
    from lesion_tasks.core import db
    from lesion_tasks.ingest import label_import

    db.upgrade(settings)
    result = label_import.import_labels(args.csv, settings)
    _emit(args, result, label_import.summary(result))
    return 0


def _cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from lesion_tasks import pipeline
    from lesion_tasks.assessment.gate import shown
    from lesion_tasks.core import db
    from lesion_tasks.model.config import config_from_cli

    db.upgrade(settings)
    config = config_from_cli(args)
    result = pipeline.run(settings, config)
    t = result["metrics"]["test"]

    def num(key: str) -> str:  # rounded down, as the gate's reasons: on the same side of a floor as the value
        return "undefined" if t.get(key) is None else shown(t[key])

    human = (f"model {result['model_version']}: {'PROMOTED to champion' if result['promoted'] else 'NOT promoted'}\n"
             f"  test AUC {num('auc')}  melanoma sensitivity {num('mel_sensitivity')}  specificity "
             f"{num('mel_specificity')}  balanced accuracy {num('balanced_accuracy')}  (threshold {result['threshold']:.4f})\n"
             + "".join(f"  {r}\n" for r in result["gate"]["reasons"])
             + (f"  WEIGHTS FALLBACK: {result['weights_fallback']}\n" if result["weights_fallback"] else "")
             + f"  report: {result['report_uri']}\n  backbone runs: {result['feature_cache']['computed']} "
             f"(cached {result['feature_cache']['reused']}), head training {result['head_seconds']} s, wall {result['wall_seconds']} s")
    _emit(args, result, human)
    return 0


def _cmd_score(args: argparse.Namespace, settings: Settings) -> int:
    from lesion_tasks.core import db
    from lesion_tasks.scoring.nightly import score

    db.upgrade(settings)
    result = score(settings, args.model_version, mc_samples=args.mc_samples, limit=args.limit)
    _emit(args, result, f"model {result['model_version']}: scored {result['scored']} images "
                        f"({result['needs_review']} need review), {result['skipped']} already had a prediction")
    return 0


def _cmd_gradcam_url(args: argparse.Namespace, settings: Settings) -> int:
    from lesion_tasks.scoring.overlays import gradcam_link

    url = gradcam_link(settings, args.image_id, args.model_version, args.expires)
    _emit(args, {"image_id": args.image_id, "url": url, "expires_s": args.expires}, url)
    return 0


def _cmd_promote(args: argparse.Namespace, settings: Settings) -> int:
    from lesion_tasks.assessment import assess
    from lesion_tasks.core.db import engine_for

    engine = engine_for(settings)
    try:  # the reports of both versions say what happened
        previous = assess.promote_with_report(settings, engine, args.model_version, f"manual override: {args.reason}",
                                              args.actor, override=True)
    finally:
        engine.dispose()
    _emit(args, {"champion": args.model_version, "previous": previous, "override": True},
          f"{args.model_version} is the champion (was {previous}); override recorded: {args.reason}")
    return 0


def _cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from lesion_tasks.core import db
    from lesion_tasks.ops import consistency

    db.upgrade(settings)
    report = consistency.check(settings)
    _emit(args, report, consistency.summary(report))
    return 0 if report["ok"] else 1


def _cmd_gc(args: argparse.Namespace, settings: Settings) -> int:
    from lesion_tasks.core import db
    from lesion_tasks.ops import retention

    db.upgrade(settings)
    result = retention.collect_garbage(settings, keep_versions=args.keep_versions, dry_run=args.dry_run)
    _emit(args, result, retention.summary(result))
    return 0


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Runs tools/airflow_demo.py: the demo goes through Airflow, which this package never imports."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "tools" / "airflow_demo.py"
    if not script.exists():
        raise ValueError(f"lesion demo needs the repository checkout ({script} not found)")
    cmd = [sys.executable, str(script)] + (["--data", args.data] if args.data else []) + (["--json"] if args.json else [])
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesion", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p_db = sub.add_parser("db", help="database schema")
    db_sub = p_db.add_subparsers(dest="db_command", required=True)
    p_up = db_sub.add_parser("upgrade", help="apply migrations")
    p_up.set_defaults(func=_cmd_db_upgrade)

    p_ing = sub.add_parser("ingest", help="validate and record one ISIC drop (folder or .zip)")
    p_ing.add_argument("source", help="folder, .zip, or a drop folder/.zip key in the store (incoming/...)")
    p_ing.add_argument("--drop-id", help="id of the drop (default: its folder or file name; <site>-<name> for "
                                         "incoming/<site>/<name>; plus a hash where a name is not plain ASCII or too long)")
    p_ing.add_argument("--site", help="the clinic or collection the drop comes from (default: its site.txt, else "
                                      "incoming/<site>/..., else the drop id); matched case-blind, see docs/sites.md")
    p_ing.set_defaults(func=_cmd_ingest)

    p_sites = sub.add_parser("sites", help="every site: status for the champion, labelled images, threshold, metrics")
    p_sites.set_defaults(func=_cmd_sites)
    sites_sub = p_sites.add_subparsers(dest="sites_command")
    p_sample = sites_sub.add_parser("sample", help="a site's validation sample: the images to label first")
    p_sample.add_argument("site")
    p_sample.add_argument("--size", type=int, default=200, help="images in the sample (default 200; larger extends it)")
    p_sample.set_defaults(func=_cmd_sites)

    p_labels = sub.add_parser("labels", help="labels that arrive later (histopathology, expert panel)")
    labels_sub = p_labels.add_subparsers(dest="labels_command", required=True)
    p_import = labels_sub.add_parser("import", help="apply a CSV image_id,diagnosis[,label_source]")
    p_import.add_argument("csv")
    p_import.set_defaults(func=_cmd_labels_import)

    p_train = sub.add_parser("train", help="retrain: split, train, evaluate, gate, promote")
    from lesion_tasks.model.config import add_cli_options

    add_cli_options(p_train)  # the same settings, types and bounds as lesion_retrain's form
    p_train.set_defaults(func=_cmd_train)

    p_score = sub.add_parser("score", help="score every image without a prediction from the model version")
    p_score.add_argument("--model-version", default="champion", help="a model version or 'champion' (default)")
    p_score.add_argument("--mc-samples", type=int, help="MC-dropout samples T (default: the model version's)")
    p_score.add_argument("--limit", type=int, help="score at most N images")
    p_score.set_defaults(func=_cmd_score)

    p_link = sub.add_parser("gradcam-url", help="a time-limited link to an image's Grad-CAM overlay")
    p_link.add_argument("image_id")
    p_link.add_argument("--model-version", default="champion")
    p_link.add_argument("--expires", type=int, default=3600, help="seconds the link stays valid (default 3600)")
    p_link.set_defaults(func=_cmd_gradcam_url)

    p_promote = sub.add_parser("promote", help="manual override: make a model version the champion")
    p_promote.add_argument("model_version")
    p_promote.add_argument("--reason", required=True, help="why the gate is overridden (recorded)")
    p_promote.add_argument("--actor", default=os.environ.get("USER", "unknown"), help="who overrides (recorded)")
    p_promote.set_defaults(func=_cmd_promote)

    p_check = sub.add_parser("check", help="consistency of the database and the object store (exit 1 when not)")
    p_check.set_defaults(func=_cmd_check)

    p_gc = sub.add_parser("gc", help="retention: prune old model versions' heavy artifacts (rows are kept)")
    p_gc.add_argument("--keep-versions", type=int, default=3,
                      help="keep the artifacts of the N newest versions besides the champion (default 3)")
    p_gc.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    p_gc.set_defaults(func=_cmd_gc)

    p_demo = sub.add_parser("demo", help="run the pipeline on the embedded defaults")
    p_demo.add_argument("--data", help="an ISIC drop folder or .zip (default: a synthetic drop)")
    p_demo.set_defaults(func=_cmd_demo)

    for p in (p_up, p_ing, p_sites, p_sample, p_import, p_train, p_score, p_link, p_promote, p_check, p_gc, p_demo):  # --json accepted after the subcommand too
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object on stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)
    from lesion_tasks.core.store import StoreError

    try:
        settings = Settings.from_env()
        return args.func(args, settings)
    except (ValueError, StoreError) as exc:
        log.error("%s", exc)
        if args.json:
            print(json.dumps({"error": str(exc)}))
        return 2


if __name__ == "__main__":
    sys.exit(main())
