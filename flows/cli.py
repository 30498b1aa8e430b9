"""`fss`: the command line. Each command runs a flow (or a plain read) and says what it did."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

DEFAULT_STORE = "data/store.zarr"


def _splits(text: str) -> list[str]:
    return [s for s in (p.strip() for p in text.split(",")) if s]


def cmd_synth(args: argparse.Namespace) -> int:
    from tasks.data.synth import synthesize

    t0 = time.perf_counter()
    summary = synthesize(args.out, n_train=args.train, n_val=args.val, size=args.size,
                         seed=args.seed, progress=True)
    counts = summary["counts"]
    print(f"synthetic benchmark in {args.out} ({time.perf_counter() - t0:.1f} s): "
          f"images {counts['images']}, instances {counts['instances']}, "
          f"images with 2+ classes {counts['images_with_2plus_classes']}")
    print(f"  VOC layout:  {Path(args.out) / 'voc'}\n  COCO layout: {Path(args.out) / 'coco'}")
    return 0


def _ingest_source(args: argparse.Namespace) -> tuple[str, str, list[str]]:
    """(source, root, splits) of `fss ingest`; a bad layout file fails here, at once."""
    if not args.layout:
        if not args.root:
            raise ValueError("ingest --source needs --root (the dataset folder)")
        return args.source, str(Path(args.root).resolve()), _splits(args.split or "train,val")
    from tasks.data.layout import LayoutError, load_layout

    if args.root or args.classes or args.list:
        raise ValueError("a layout file names the root, the files and the classes: drop "
                         "--root, --classes and --list")
    path = str(Path(args.layout).resolve())
    layout, _ = load_layout(path)
    splits = _splits(args.split) if args.split else list(layout.splits)
    unknown = [s for s in splits if s not in layout.splits]
    if unknown:
        raise LayoutError(f"{path}: splits: --split {unknown[0]!r} is not one of the "
                          f"layout's splits {layout.splits}")
    return "layout", path, splits


def cmd_ingest(args: argparse.Namespace) -> int:
    from flows.ingest import run_ingest
    from flows.runtime import prefect_api

    t0 = time.perf_counter()
    source, root, splits = _ingest_source(args)
    with prefect_api():
        summary = run_ingest(
            workers=args.workers, dask_address=args.dask_address, source=source, root=root,
            store_url=args.store, name=args.name, splits=splits, size=args.size,
            shard_size=args.shard_size, classes_file=args.classes, list_file=args.list,
            resize=args.resize)
    print_ingest_summary(summary, time.perf_counter() - t0)
    return 0 if summary["complete"] else 1


def print_ingest_summary(summary: dict[str, Any], seconds: float) -> None:
    s = summary
    print(f"ingested {s['name']} ({s['version']}) in {seconds:.1f} s: "
          f"{s['shards_written']} shards written, {s['shards_skipped']} already complete")
    bare = f" ({s['unlabelled']} without a mask)" if s.get("unlabelled") else ""
    print(f"  ingested {s['ingested']}{bare} + quarantined {s['quarantined']} = "
          f"{s['ingested'] + s['quarantined']} of {s['listed']} listed"
          + ("" if s["complete"] else f" ({s['pending']} pending: rerun to resume)"))
    if s["quarantined"]:
        print("  see the quarantine with: fss store inspect STORE")


def cmd_inspect(args: argparse.Namespace) -> int:
    from tasks.data.store import inspect_store

    info = inspect_store(args.store)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if not info["datasets"]:
        print(f"{args.store}: no datasets")
    for name, versions in info["datasets"].items():
        for version, v in versions.items():
            mark = " (latest)" if v["latest"] else ""
            mib = sum(v["bytes"].values()) / 2**20
            pad = " (aspect kept, padded)" if v.get("resize") == "pad" else ""
            print(f"{name} {version}{mark}: {v['ingested']} ingested + {v['quarantined']} "
                  f"quarantined of {v['listed']} listed, {v['pending']} pending; "
                  f"{v['size']} px{pad}; {mib:.1f} MiB")
            print("  splits: " + ", ".join(f"{k} {n}" for k, n in v["splits"].items()))
            print(f"  classes ({len(v['classes']) - 1}): " + ", ".join(v["classes"][1:]))
            print("  bytes: " + ", ".join(f"{k} {b / 2**20:.1f} MiB"
                                          for k, b in v["bytes"].items()))
            for q in v["quarantine"]:
                print(f"  quarantined {q['path']}: {q['reason']}")
    return 0


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
    from flows.ui import DEFAULT_PORT
    from tasks.study.tracking import runs_url, tracking_uri

    uri = tracking_uri()
    server = uri if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{DEFAULT_PORT}"
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
    summary = report.build_summary(results, report.load_episodes(results))
    paths = report.write_summary(summary, results, Path(args.out) / name,
                                 title=f"{name}: mIoU vs labelled images",
                                 points=report.load_point_artifacts(results))
    status = run.info.status.lower()
    print(f"ablation {name} ({status}): {len(results)} finished points")
    print(report.to_markdown(summary))
    print(f"plot: {paths['plot']}")
    print(f"HTML report (tables, plot, per-class IoU, overlays): {paths['html']}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from flows import runtime

    if args.action == "start":
        print(f"Prefect server at {runtime.start_persistent_server(port=args.port)}")
    elif args.action == "stop":
        print("stopped" if runtime.stop_persistent_server() else "no server recorded")
    else:
        url = runtime.recorded_server()
        print(f"running at {url}" if url else "not running")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    return run_demo(workdir=Path(args.workdir), quick=args.quick, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fss", description=__doc__)
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (a user error is otherwise one line)")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    s = data.add_parser("synth", help="write the synthetic benchmark in VOC and COCO formats")
    s.add_argument("--out", default="data/synth", help="output folder (default: %(default)s)")
    s.add_argument("--train", type=int, default=600, help="training images")
    s.add_argument("--val", type=int, default=200, help="validation images")
    s.add_argument("--size", type=int, default=144, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    i = sub.add_parser("ingest", help="ingest a VOC- or COCO-format dataset, or any dataset a "
                                      "layout file describes, into the store")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", choices=["voc", "coco"], help="a VOC- or COCO-format dataset")
    src.add_argument("--layout", help="a layout file (YAML: root, images, masks, splits, "
                                      "classes, background, ignore, ...)")
    i.add_argument("--root", help="dataset root folder (with --source)")
    i.add_argument("--split", help="comma-separated splits (default: train,val, or the "
                                   "layout's splits)")
    i.add_argument("--store", default=DEFAULT_STORE, help="Zarr store path or fsspec URL")
    i.add_argument("--name", required=True, help="dataset name inside the store")
    i.add_argument("--size", type=int, default=144, help="canonical image side")
    i.add_argument("--resize", choices=["square", "pad"], default="square",
                   help="square: stretch to size x size (HSNet); pad: keep the aspect ratio, "
                        "longest side to size, pad the rest (PFENet; padding is ignored). "
                        "Default: %(default)s")
    i.add_argument("--shard-size", type=int, default=64, help="images per shard and per task")
    i.add_argument("--classes", help="class list file (one name per line, line 0 background)")
    i.add_argument("--list", help="VOC list file overriding ImageSets/Segmentation/<split>.txt")
    g = i.add_mutually_exclusive_group()
    g.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    g.add_argument("--dask-address", help="existing Dask scheduler (or env FSS_DASK_ADDRESS)")
    i.set_defaults(func=cmd_ingest)

    st = sub.add_parser("store", help="the Zarr store").add_subparsers(dest="action",
                                                                         required=True)
    ins = st.add_parser("inspect", help="datasets, counts, classes, quarantine and sizes")
    ins.add_argument("store", nargs="?", default=DEFAULT_STORE)
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)

    t = sub.add_parser("train", help="train and evaluate one config (tracked in MLflow)")
    t.add_argument("--config", help="a study's YAML under configs/")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable; dotted keys for model_args)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a trained run or checkpoint on its test fold")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run folder (runs/<name>)")
    src.add_argument("--checkpoint", help="a checkpoint file")
    src.add_argument("--baseline", choices=["all-foreground", "colour-histogram"],
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
    a.add_argument("--out", default="reports", help="folder for the summary table and plot")
    a.add_argument("--study", help="run under this study name instead of the file's (a variant "
                                   "made with --set or --grid gets its own parent run)")
    ga = a.add_mutually_exclusive_group()
    ga.add_argument("--workers", type=int, default=1, help="LocalCluster worker processes")
    ga.add_argument("--dask-address", help="existing Dask scheduler (or env FSS_DASK_ADDRESS)")
    a.set_defaults(func=cmd_ablate)

    r = sub.add_parser("report", help="summary tables (95 %% intervals, budget estimate), plot "
                                      "and HTML report of an ablation (also running)")
    r.add_argument("--experiment", required=True, help="MLflow experiment of the study")
    r.add_argument("--study", help="study name (default: the latest ablation)")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or "
                                          "sqlite:///<cwd>/mlflow.db), e.g. sqlite:///demo/mlflow.db")
    r.add_argument("--out", default="reports")
    r.set_defaults(func=cmd_report)

    sv = sub.add_parser("server", help="a persistent local Prefect server (127.0.0.1)")
    sv.add_argument("action", choices=["start", "stop", "status"])
    sv.add_argument("--port", type=int, default=4200)
    sv.set_defaults(func=cmd_server)

    # Stages owned by their flow modules: each adds its own subcommand.
    from flows.deployments import add_deploy_parser
    from flows.features import add_features_parser
    from flows.pretrain import add_pretrain_parser
    from flows.pseudo import add_pseudo_parser
    from flows.ui import add_ui_parser

    for add in (add_pretrain_parser, add_features_parser, add_pseudo_parser, add_ui_parser,
                add_deploy_parser):
        add(sub)

    d = sub.add_parser("demo", help="the end-to-end demo on the synthetic benchmark")
    d.add_argument("--workdir", default="demo", help="where data, store and runs go")
    d.add_argument("--quick", action="store_true", help="a smoke run of a minute or two")
    d.add_argument("--workers", type=int, default=2)
    d.set_defaults(func=cmd_demo)
    return p


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # SIGTERM (kill, Kubernetes, CI timeouts) unwinds like Ctrl-C, so `finally` blocks stop the
    # temporary Prefect server and Dask cluster instead of orphaning them.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    # Keep the terminal for progress bars and results: Prefect prints warnings and errors only,
    # while run logs (get_run_logger, INFO) still reach the API and the UI. Set before anything
    # imports dask or prefect (building the parser does), and inherited by the Dask workers.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    hide = None if args.debug else _HideUserErrors()
    for handler in logging.getLogger().handlers if hide else ():
        handler.addFilter(hide)
    try:
        return args.func(args)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"fss: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        for handler in logging.getLogger().handlers if hide else ():
            handler.removeFilter(hide)


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause (a wrong path, a bad layout or config, an unknown dataset): one
    line and exit 2. Anything else is a bug and keeps its traceback."""
    import yaml

    from tasks.data.readers import DatasetError
    from tasks.data.store import StoreError

    # LayoutError is a DatasetError; pydantic's ValidationError is a ValueError; a bad
    # checkpoint file is a ValueError (tasks.fewshot.training.load_state); FileExistsError and
    # PermissionError are OSErrors, with the others of USER_ERRNOS.
    return (DatasetError, StoreError, ValueError, FileNotFoundError, RuntimeError,
            yaml.YAMLError)


# OSErrors that the user's disk or paths cause, not a bug: a full disk or quota, a read-only
# file system, no permission, a file where a folder should be (or the other way round).
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                         errno.EEXIST, errno.ENOTDIR, errno.EISDIR})


def is_user_error(exc: BaseException) -> bool:
    """Whether `main` prints ``exc`` as one line and exits 2 (else it is a bug: traceback)."""
    return isinstance(exc, user_errors()) or (
        isinstance(exc, OSError) and exc.errno in USER_ERRNOS)


def _one_line(exc: BaseException) -> str:
    import yaml

    if isinstance(exc, OSError) and exc.errno in USER_ERRNOS and exc.strerror:
        return _os_error_line(exc)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, yaml.YAMLError):  # PyYAML spreads its position over several lines
        text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    return " ".join(text.split("\n"))  # one line, whatever the message


def _os_error_line(exc: OSError) -> str:
    """``<path>: <reason>`` of a disk or path error. A failed write() names no file: then the
    file is the innermost one the failing code held (a Path, or an open file's name)."""
    path = exc.filename if exc.filename is not None else _file_at_fault(exc.__traceback__)
    where = f"{os.fsdecode(path)}: " if path is not None else ""
    if exc.filename2 is not None:
        where = f"{os.fsdecode(exc.filename)} -> {os.fsdecode(exc.filename2)}: "
    hint = {errno.ENOSPC: " (free some space and rerun: finished shards, checkpoints and "
                          "points are kept)",
            errno.EDQUOT: " (free some space and rerun)",
            errno.EROFS: " (write the store, runs and reports somewhere writable)"}
    return f"{where}{exc.strerror}{hint.get(exc.errno, '')}"


def _file_at_fault(tb: Any) -> str | None:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):  # innermost first
        for value in frame.f_locals.values():
            if isinstance(value, Path):
                return str(value)
            name = getattr(value, "name", None) if hasattr(value, "write") else None
            if isinstance(name, str) and name:
                return name
    return None


class _HideUserErrors(logging.Filter):
    """Console handlers only: Prefect logs a flow's or task's exception with its traceback
    before the flow re-raises it; for a user error the one line of `main` says it all (the
    Prefect API and UI still get the full record). Also hides the events worker's shutdown
    note ("Still processing items") that an early failure leaves behind."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_user_error(exc):
            return False
        return not (record.name == "EventsWorker"
                    and str(record.msg).startswith("Still processing items"))


if __name__ == "__main__":
    sys.exit(main())
