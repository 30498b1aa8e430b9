"""`fss train`, `fss evaluate`, `fss ablate`, `fss report`: training and the label-budget study."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from flows.cli.data import add_cluster_arguments
from tasks import defaults

BASELINES = ("all-foreground", "colour-histogram")  # models.baselines.BASELINES (torch) names


def add_parsers(sub: Any) -> None:
    t = sub.add_parser("train", help="train and evaluate one config (tracked in MLflow)")
    t.add_argument("--config", help="a study's YAML under configs/")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable; dotted keys for model_args)")
    t.set_defaults(func=cmd_train, runs_flows=True)

    e = sub.add_parser("evaluate", help="evaluate a trained run or checkpoint on its test fold")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run folder (runs/<name>)")
    src.add_argument("--checkpoint", help="a checkpoint file")
    src.add_argument("--baseline", choices=BASELINES,
                     help="a trivial baseline (needs --config for the data and protocol)")
    e.add_argument("--config", help="evaluate with this config instead of the checkpoint's")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. test_episodes=1000 scoring=hsnet test_shots=[5]")
    e.add_argument("--out", default="eval", help="folder for tables and overlays")
    e.set_defaults(func=cmd_evaluate)

    a = sub.add_parser("ablate", help="label-budget ablation: models x budgets x folds x ...")
    a.add_argument("--config", required=True, help="a study YAML (configs/ablation-*.yaml)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of every point, e.g. steps=50")
    a.add_argument("--grid", action="append", default=[], metavar="KEY=[VALUES]",
                   help="replace a grid axis, e.g. seed=[0,1,2]; finished points are kept")
    a.add_argument("--out", default=defaults.REPORT_DIR,
                   help="folder for the summary table and plot")
    a.add_argument("--study", help="run under this study name instead of the file's (a variant "
                                   "made with --set or --grid gets its own parent run)")
    add_cluster_arguments(a, workers=defaults.ABLATION_WORKERS)
    a.set_defaults(func=cmd_ablate, runs_flows=True)

    r = sub.add_parser("report", help="summary tables (95 %% intervals, budget estimate), plot "
                                      "and HTML report of an ablation (also running)")
    r.add_argument("--experiment", required=True, help="MLflow experiment of the study")
    r.add_argument("--study", help="study name (default: the latest ablation)")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or "
                                          "sqlite:///<cwd>/mlflow.db), e.g. sqlite:///demo/mlflow.db")
    r.add_argument("--out", default=defaults.REPORT_DIR, help="folder for the tables and plot")
    r.add_argument("--baseline", default=None, metavar="MODEL",
                   help="the model every other one is compared with at each budget (default: "
                        "panet; without it in a setting, every pair)")
    r.set_defaults(func=cmd_report)


def cmd_train(args: argparse.Namespace) -> int:
    from flows.runtime import prefect_api
    from flows.train import train_flow
    from tasks.fewshot.config import load_config

    cfg = load_config(args.config, args.set)  # a bad config stops here: nothing created yet
    with prefect_api():
        result = train_flow(cfg)
    print_point(result)
    return 0


def print_point(result: dict[str, Any]) -> None:
    state = "already done, read back" if result.get("skipped") else "trained"
    print(f"{result['run_name']} ({state}); MLflow run {result['run_id']}")
    val = result.get("val_miou")
    if val is None:  # too few held-out labelled images to select: the last checkpoint is kept
        print(f"  {result.get('selection', 'last checkpoint')}")
    else:
        print(f"  best validation mIoU (base classes) {val:.3f} at step {result['best_step']}")
    for key, value in result.items():
        if key.startswith("test") and key.endswith("miou"):
            fb = result[key.replace("miou", "fbiou")]
            print(f"  {key:<24} {100 * value:6.2f}   FB-IoU {100 * fb:6.2f}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tasks.data.store import open_dataset
    from tasks.fewshot.config import apply_overrides, from_dict, load_config
    from tasks.fewshot.experiment import write_eval_artifacts
    from tasks.fewshot.training import build_model, evaluate_fold, load_state

    if args.baseline:
        from models.baselines import BASELINES

        cfg = load_config(args.config, args.set)
        model = BASELINES[args.baseline]()
    else:
        ckpt = Path(args.run) / "checkpoints" / "best.pt" if args.run else Path(args.checkpoint)
        if not ckpt.exists():
            raise FileNotFoundError(f"no checkpoint at {ckpt}")
        state = load_state(ckpt)
        if args.config:
            cfg = load_config(args.config, args.set)
        else:  # the checkpoint carries the config it was trained with
            origins: dict = {}
            cfg = from_dict(apply_overrides(state["config"], args.set, origins), origins,
                            where=f"{ckpt} (its config)")
        model = build_model(cfg)
        model.load_state_dict(state["model"])
    ds = open_dataset(cfg.store, cfg.dataset)
    out = Path(args.out)
    for r in evaluate_fold(cfg, model, keep_samples=8, dataset=ds):
        tag = f"{r.ways}w{r.shots}s"
        write_eval_artifacts(out / tag, r, ds.classes)
        print(f"{tag}: mIoU {100 * r.miou:.2f}  FB-IoU {100 * r.fbiou:.2f}  "
              f"({r.episodes} episodes, {r.seconds:.1f} s)")
        for name, iou in r.per_class.items():
            print(f"    {name:<24} {100 * iou:6.2f}")
    print(f"per-class tables and overlays in {out}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from flows.ablate import run_ablation
    from flows.runtime import prefect_api
    from tasks.study.ablation import load_study

    # Every point is validated here, before the Prefect API, the cluster or any run exists. A
    # variant (--set optimizer=sgd) named by --study gets its own parent run and summary.
    study = load_study(args.config, args.set, grid_items=args.grid, name=args.study)
    t0 = time.perf_counter()
    with prefect_api():
        out = run_ablation(study.spec, workers=args.workers, dask_address=args.dask_address,
                           overrides=args.set, out_dir=args.out)
    print(f"ablation {study.name}: {out['points']} points, {out['trained']} trained, "
          f"{out['skipped']} already done, {len(out['failed'])} failed "
          f"({time.perf_counter() - t0:.0f} s)")
    for message in out["failed"]:
        print(f"  failed: {message}")
    print(out["report"])
    print(f"table and plot: {Path(out['files']['markdown']).parent}; parent MLflow run "
          f"{out['parent_run_id']} in experiment {out['experiment']!r}")
    for r in out.get("registered", {}).values():
        print(f"registered model: models:/{r['name']}@{r['alias']} (version {r['version']})")
    print(ui_hint(out["experiment"]))
    return 1 if out["failed"] else 0


def ui_hint(experiment: str | None = None) -> str:
    """How to open the experiment's runs table (not the root: MLflow 3.17 shows GenAI there)."""
    from tasks.study.tracking import runs_url, tracking_uri

    uri = tracking_uri()
    local = f"http://127.0.0.1:{defaults.MLFLOW_UI_PORT}"
    server = uri if uri.startswith(("http://", "https://")) else local
    page = server
    if experiment:
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(uri).get_experiment_by_name(experiment)
        page = runs_url(server, exp.experiment_id) if exp is not None else server
    if server == uri:
        return f"compare runs in the MLflow UI: {page}"
    return (f"compare runs in the MLflow UI: fss ui --backend-store-uri {uri}\n"
            f"  then open {page}")


def cmd_report(args: argparse.Namespace) -> int:
    if args.tracking_uri:  # before anything reads it
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    from tasks.study import report
    from tasks.study.tracking import check_reachable, tracking_uri

    uri = tracking_uri()
    check_reachable(uri)
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if db is not None and not db.exists():  # reading would create an empty one
        raise FileNotFoundError(f"no MLflow database at {db} (tracking URI {uri})")
    run = report.parent_run(args.experiment, args.study)
    if run is None:
        found = report.studies(args.experiment)
        where = f"at {uri}"
        if found is None:
            raise ValueError(f"no experiment {args.experiment!r} {where}")
        known = f"its studies: {', '.join(found)}" if found else "it holds no ablation"
        what = f"study {args.study!r}" if args.study else "ablation"
        raise ValueError(f"no {what} in experiment {args.experiment!r} {where}; {known}")
    results = report.child_results(run.info.run_id)
    name = run.data.tags.get(report.STUDY_TAG, "study")
    baseline = args.baseline or report.BASELINE
    models = sorted(results["model"].unique())
    if args.baseline and args.baseline not in models:
        raise ValueError(f"--baseline {args.baseline!r}: study {name!r} has no finished point of "
                         f"that model (its models: {', '.join(models) or 'none yet'})")
    summary = report.build_summary(results, report.load_episodes(results), baseline=baseline)
    paths = report.write_summary(summary, results, Path(args.out) / name,
                                 title=f"{name}: mIoU vs labelled images",
                                 points=report.load_point_artifacts(results))
    status = run.info.status.lower()
    print(f"ablation {name} ({status}): {len(results)} finished points")
    print(report.to_markdown(summary))
    print(f"plot: {paths['plot']}")
    print(f"HTML report (tables, plot, per-class IoU, overlays): {paths['html']}")
    return 0
