"""Ablation summaries read back from MLflow: intervals per budget, the budget estimate, a plot.

The flow and `fss report` share this code, and it reads only MLflow, so it works the same on a
finished study and on one that is still running. The statistics live in `tasks/study/intervals.py`:
per budget, mIoU with a 95 % hierarchical paired bootstrap interval (seeds and test episodes
resampled), its difference to and fraction of the 100 % budget, and per model the labelled
images needed for 90 % and 95 % of full supervision. Runs logged before the per-episode
artifact existed still get their mean, with "n/a" intervals.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.study import intervals
from tasks.study.intervals import BudgetEstimate, PowerLawFit
from tasks.study.tracking import TEST_CLASSES_TAG, TEST_DROPPED_TAG, TEST_EPISODES_TAG

STUDY_TAG = "fss.study"
KIND_TAG = "fss.kind"
TAG_COLUMNS = ["model", "budget", "fold", "shots", "ways", "seed", "budget_seed"]
CLASS_TAGS = {"scored_classes": TEST_CLASSES_TAG, "dropped_classes": TEST_DROPPED_TAG}
METRIC_COLUMNS = {"miou": "test/miou", "fbiou": "test/fbiou", "labels_images": "labels/images",
                  "labels_pixels": "labels/pixels"}
EPISODES_ARTIFACT = "eval/test/episodes.csv"
PER_CLASS_ARTIFACT = "eval/test/per_class_iou.csv"
OVERLAYS_ARTIFACT = "eval/test/overlays.png"
GROUP = ["model", "ways", "shots"]
# The model every other one is compared with (`fss report --baseline`), when a setting has
# it; else every pair.
BASELINE = "panet"
# A run's mIoU recomputed from its episode rows must match its logged test/miou.
MIOU_TOLERANCE = 1e-6

BIAS_NOTE = (
    "Power laws fitted on small budgets under-estimate the data needed (Mahmood et al., CVPR "
    "2022, \"How much more data do I need?\"), so the recommended figure is the upper end of "
    "the 95 % bootstrap interval; the point estimate beside it is optimistic.")


# --- reading MLflow ---------------------------------------------------------------------------


def parent_run(experiment: str, study: str | None = None) -> Any | None:
    """The latest ablation parent run of an experiment (of one study, if named)."""
    from mlflow.tracking import MlflowClient

    from tasks.study.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"tags.`{KIND_TAG}` = 'ablation'"
    if study:
        query += f" and tags.`{STUDY_TAG}` = '{study}'"
    runs = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def studies(experiment: str) -> list[str] | None:
    """The studies with a parent run in an experiment (None when the experiment does not exist)."""
    from mlflow.tracking import MlflowClient

    from tasks.study.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`{KIND_TAG}` = 'ablation'",
                              max_results=1000)
    return sorted({r.data.tags.get(STUDY_TAG, "?") for r in runs})


def child_results(parent_run_id: str) -> pd.DataFrame:
    """One row per finished child run: its tags, test metrics, labelled images and pixels, the
    classes scored and dropped (comma-separated, None when not recorded) and its run id."""
    from mlflow.tracking import MlflowClient

    from tasks.study.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=5000)
    rows = []
    for r in runs:
        if "test/miou" not in r.data.metrics:
            continue  # still training, or failed
        row = {c: r.data.tags.get(c) for c in TAG_COLUMNS}
        row |= {c: r.data.metrics.get(m, math.nan) for c, m in METRIC_COLUMNS.items()}
        row |= {c: r.data.tags.get(t) for c, t in CLASS_TAGS.items()}
        rows.append(row | {"test_key": r.data.tags.get(TEST_EPISODES_TAG),
                           "run_id": r.info.run_id})
    columns = [*TAG_COLUMNS, *METRIC_COLUMNS, *CLASS_TAGS, "test_key", "run_id"]
    df = pd.DataFrame(rows, columns=columns)
    df["budget"] = df["budget"].astype(float)
    for col in ("ways", "shots"):  # numeric, so that 10-way sorts after 2-way
        as_int = pd.to_numeric(df[col], errors="coerce")
        if as_int.notna().all():
            df[col] = as_int.astype(int)
    return df


_EPISODES: dict[str, pd.DataFrame] = {}
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def _download(run_id: str, artifact: str, cache_dir: Path | None = None) -> bytes | None:
    """One artifact of a run, or None when the run has none. ``cache_dir`` keeps the file
    (under ``cache_dir/run_id``); without it the download goes to a temporary folder."""
    import tempfile

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from tasks.study.tracking import tracking_uri

    # One progress bar per run would bury the report.
    quiet = os.environ.get(_PROGRESS_BAR)
    os.environ[_PROGRESS_BAR] = "false"
    try:
        with tempfile.TemporaryDirectory(prefix="fss-report-") as tmp:
            dst = Path(tmp) if cache_dir is None else cache_dir / run_id
            dst.mkdir(parents=True, exist_ok=True)
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=str(dst),
                tracking_uri=tracking_uri())
            return Path(path).read_bytes()
    except (MlflowException, OSError):
        return None
    finally:
        if quiet is None:
            del os.environ[_PROGRESS_BAR]
        else:
            os.environ[_PROGRESS_BAR] = quiet


def run_episodes(run_id: str, cache_dir: Path | None = None) -> pd.DataFrame | None:
    """A run's `EPISODES_ARTIFACT` (None when the run has none: runs logged before it existed).

    Cached per run in memory (a finished run's artifacts never change); ``cache_dir`` keeps the
    downloaded files. A missing artifact is not cached: a running study may log it later.
    """
    if run_id in _EPISODES:
        return _EPISODES[run_id]
    data = _download(run_id, EPISODES_ARTIFACT, cache_dir)
    if data is None:
        return None
    _EPISODES[run_id] = table = pd.read_csv(io.BytesIO(data))
    return table


def load_episodes(results: pd.DataFrame, cache_dir: Path | None = None) -> dict[str, pd.DataFrame]:
    """Episode tables of the runs of ``results`` that have one, by run id."""
    tables = {rid: run_episodes(rid, cache_dir) for rid in results["run_id"]}
    return {rid: t for rid, t in tables.items() if t is not None}


@dataclass
class PointArtifacts:
    """What the HTML report shows of one point: its per-class IoU (`PER_CLASS_ARTIFACT`: rows
    `class, iou`, mIoU and FB-IoU last, as tasks/fewshot/experiment.py writes them) and its overlay
    grid (`OVERLAYS_ARTIFACT`, PNG bytes); None where the run has none."""

    per_class: pd.DataFrame | None = None
    overlays: bytes | None = None


_POINTS: dict[str, PointArtifacts] = {}


def run_point_artifacts(run_id: str, cache_dir: Path | None = None) -> PointArtifacts:
    """A run's per-class IoU and overlays, cached per run like `run_episodes`. A run is cached
    once its per-class table is there: it is logged after the overlays, so both are final."""
    if run_id in _POINTS:
        return _POINTS[run_id]
    overlays = _download(run_id, OVERLAYS_ARTIFACT, cache_dir)
    per_class = _download(run_id, PER_CLASS_ARTIFACT, cache_dir)
    found = PointArtifacts(None if per_class is None else pd.read_csv(io.BytesIO(per_class)),
                           overlays)
    if per_class is not None:
        _POINTS[run_id] = found
    return found


def load_point_artifacts(results: pd.DataFrame,
                         cache_dir: Path | None = None) -> dict[str, PointArtifacts]:
    """Per-class IoU and overlays of every run of ``results``, by run id."""
    return {rid: run_point_artifacts(rid, cache_dir) for rid in results["run_id"]}


# --- the summary ------------------------------------------------------------------------------


@dataclass
class Summary:
    """Everything a report shows. ``table``: one row per model × ways × shots × budget, mIoU,
    Δ and % of 100 % with intervals (``_lo``/``_hi``), all in %; ``estimates``: one row per
    model × ways × shots × target; ``classes``: classes scored and dropped per fold × ways ×
    shots; ``comparisons``: one row per pair of models × ways × shots × budget, the paired
    difference in mIoU (`COMPARISON_COLUMNS`); ``fits``: the accepted power-law fits, for the
    plot."""

    table: pd.DataFrame
    estimates: pd.DataFrame
    classes: pd.DataFrame
    comparisons: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=COMPARISON_COLUMNS))
    warnings: list[str] = field(default_factory=list)
    fits: dict[tuple[Any, ...], PowerLawFit] = field(default_factory=dict)
    n_boot: int = intervals.N_BOOT
    baseline: str = BASELINE


TABLE_COLUMNS = [*GROUP, "budget", "images", "pixels", "miou_mean", "miou_lo", "miou_hi",
                 "delta", "delta_lo", "delta_hi", "fraction", "fraction_lo", "fraction_hi",
                 "miou_std", "fbiou_mean", "runs", "episodes"]
COMPARISON_COLUMNS = ["ways", "shots", "budget", "model", "baseline", "diff", "diff_lo",
                      "diff_hi", "runs", "baseline_runs", "episodes", "verdict"]
ESTIMATE_COLUMNS = [*GROUP, "target", "target_miou", "images", "images_lo", "images_hi",
                    "recommended", "region", "point_region", "measured_min", "measured_max",
                    "refusal", "note", "fit_a", "fit_b", "fit_c", "fit_r2"]


def build_summary(results: pd.DataFrame, episodes: Mapping[str, pd.DataFrame] | None = None, *,
                  n_boot: int = intervals.N_BOOT, seed: int = 0,
                  baseline: str = BASELINE) -> Summary:
    """The summary of the child runs ``results`` (`child_results`); ``episodes`` maps run ids
    to their episode tables (`load_episodes`); without it every interval is n/a. Models are
    compared with ``baseline`` where a setting has it."""
    results = _with_columns(results)
    tables, estimates, warnings, fits = [], [], [], {}
    for key, group in results.groupby(GROUP, sort=True):
        table, group_estimates, group_warnings = _group_summary(group, episodes or {}, n_boot,
                                                                seed)
        tables.append(table)
        estimates += [_estimate_row(key, e) for e in group_estimates]
        warnings += [f"{_setting(key)}: {w}" for w in group_warnings]
        accepted = [e.fit for e in group_estimates if e.refusal is None and e.fit is not None]
        if accepted:
            fits[key] = accepted[0]
    classes, class_warnings = _classes(results)
    comparisons, comparison_warnings = _comparisons(results, episodes or {}, n_boot, seed,
                                                    baseline)
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return Summary(table.reindex(columns=TABLE_COLUMNS),
                   pd.DataFrame(estimates, columns=ESTIMATE_COLUMNS), classes,
                   comparisons, class_warnings + warnings + comparison_warnings, fits, n_boot,
                   baseline)


def _with_columns(results: pd.DataFrame) -> pd.DataFrame:
    """Tolerate frames written before the label and class columns existed."""
    out = results.copy()
    for col in [*METRIC_COLUMNS, *CLASS_TAGS, "test_key"]:
        if col not in out.columns:
            out[col] = math.nan if col in METRIC_COLUMNS else None
    return out


def summarize(results: pd.DataFrame, episodes: Mapping[str, pd.DataFrame] | None = None, *,
              n_boot: int = intervals.N_BOOT, seed: int = 0) -> pd.DataFrame:
    """The per-budget table of `build_summary` (mIoU in %, intervals n/a without episodes)."""
    return build_summary(results, episodes, n_boot=n_boot, seed=seed).table


def _group_summary(group: pd.DataFrame, episodes: Mapping[str, pd.DataFrame], n_boot: int,
                   seed: int) -> tuple[pd.DataFrame, list[BudgetEstimate], list[str]]:
    """Per-budget rows (in %), the estimates and the warnings of one model × ways × shots."""
    per_budget = group.groupby("budget").agg(
        images=("labels_images", "mean"), pixels=("labels_pixels", "mean"),
        miou_std=("miou", "std"), fbiou_mean=("fbiou", "mean"), runs=("miou", "size"))
    per_budget["miou_std"] = per_budget["miou_std"].fillna(0.0)
    keys = dict(zip(GROUP, group[GROUP].iloc[0], strict=True))
    missing = [rid for rid in group["run_id"] if rid not in episodes]
    if missing:
        refusal = f"no episode-level results ({EPISODES_ARTIFACT}) to put intervals on"
        found = [BudgetEstimate(t, math.nan, refusal=refusal) for t in intervals.TARGETS]
        warning = (f"{len(missing)} of {len(group)} runs have no {EPISODES_ARTIFACT} (logged "
                   "before it existed): means only, intervals and estimates n/a")
        return _percent(_means_only(group), per_budget).assign(**keys), found, [warning]
    runs = intervals.runs_from_tables(group, [episodes[rid] for rid in group["run_id"]])
    warnings = _miou_mismatches(group, runs)
    mixed = _mixed_tests(group)
    if mixed:
        warnings.append(f"its budgets were not all scored on the same test episodes ({mixed}): "
                        "the paired intervals pair unlike things")
    boot = intervals.bootstrap_budgets(runs, n_boot=n_boot, seed=seed)
    images = per_budget["images"].reindex(boot.budgets).to_numpy()
    found = intervals.estimate_budget(boot, images)
    return _percent(boot.table(), per_budget).assign(**keys), found, warnings


def _means_only(group: pd.DataFrame) -> pd.DataFrame:
    """The statistics without episode rows: means over runs, nan intervals."""
    out = group.groupby("budget")["miou"].agg(["mean", "size"]).reset_index()
    out = out.rename(columns={"mean": "miou", "size": "n_runs"})
    full = out.loc[np.isclose(out["budget"], intervals.FULL_BUDGET), "miou"]
    full_miou = float(full.iloc[0]) if len(full) else math.nan
    out["delta"] = out["miou"] - full_miou
    out["fraction"] = out["miou"] / full_miou if full_miou > 0 else math.nan
    for stat in intervals.STATISTICS:
        out[f"{stat}_lo"] = out[f"{stat}_hi"] = math.nan
    out["n_episodes"] = math.nan
    return out


def _percent(stats: pd.DataFrame, per_budget: pd.DataFrame) -> pd.DataFrame:
    """Join the statistics with the per-budget facts, everything scored in %."""
    out = stats.rename(columns={"miou": "miou_mean", "n_episodes": "episodes"})
    out = out.drop(columns="n_runs").merge(per_budget.reset_index(), on="budget")
    scored = ["miou_mean", "miou_lo", "miou_hi", "delta", "delta_lo", "delta_hi", "fraction",
              "fraction_lo", "fraction_hi", "miou_std", "fbiou_mean"]
    out[scored] = 100 * out[scored]
    return out


def _miou_mismatches(group: pd.DataFrame, runs: list[intervals.Run]) -> list[str]:
    """The episode rows must reproduce each run's logged mIoU, or the intervals are of
    something else."""
    out = []
    for run_id, logged, run in zip(group["run_id"], group["miou"], runs, strict=True):
        if abs(run.miou - logged) > MIOU_TOLERANCE:
            out.append(f"run {run_id}: mIoU from {EPISODES_ARTIFACT} {100 * run.miou:.3f} != "
                       f"logged test/miou {100 * logged:.3f}")
    return out


def _mixed_tests(runs: pd.DataFrame) -> str | None:
    """Where runs of one fold carry different `TEST_EPISODES_TAG`s, in words (None: one key a
    fold, or keys not recorded)."""
    out = []
    for fold, rows in runs.groupby("fold", sort=True):
        keys = sorted({k for k in rows["test_key"] if isinstance(k, str) and k})
        if len(keys) > 1:
            out.append(f"fold {fold}: {TEST_EPISODES_TAG} {', '.join(keys)}")
    return "; ".join(out) or None


def _model_pairs(models: list[str], baseline: str) -> list[tuple[str, str]]:
    """(model, baseline) pairs: every model against ``baseline`` when it is there, else every
    pair in name order."""
    if baseline in models:
        return [(m, baseline) for m in models if m != baseline]
    return list(itertools.combinations(models, 2))


def _unpairable(setting: pd.DataFrame, episodes: Mapping[str, pd.DataFrame]) -> str | None:
    """Why the models of one ways × shots setting cannot be compared episode by episode."""
    if any(rid not in episodes for rid in setting["run_id"]):
        return f"not every run has its {EPISODES_ARTIFACT}"
    if not all(isinstance(k, str) and k for k in setting["test_key"]):
        return (f"not every run records its test episodes ({TEST_EPISODES_TAG}: logged before "
                "it existed)")
    mixed = _mixed_tests(setting)
    return f"they were scored on different test episodes ({mixed})" if mixed else None


def _verdict(model: str, baseline: str, lo: float, hi: float) -> str:
    if np.isnan(lo):
        return "n/a"
    if lo > 0:
        return f"{model} higher"
    if hi < 0:
        return f"{baseline} higher"
    return "noise: the interval holds 0"


def _comparisons(results: pd.DataFrame, episodes: Mapping[str, pd.DataFrame], n_boot: int,
                 seed: int, baseline: str) -> tuple[pd.DataFrame, list[str]]:
    """Model against model (`_model_pairs`) at every budget both have, per ways × shots, paired
    on the test episodes (`intervals.compare_models`); rows in %, and why a setting with
    several models has none."""
    rows, warnings = [], []
    for (ways, shots), setting in results.groupby(["ways", "shots"], sort=True):
        models = sorted(setting["model"].unique())
        if len(models) < 2:
            continue
        problem = _unpairable(setting, episodes)
        if problem:
            warnings.append(f"{ways}-way {shots}-shot: models not compared, {problem}")
            continue
        runs = intervals.runs_from_tables(setting, [episodes[r] for r in setting["run_id"]])
        by_model = {m: [r for r, name in zip(runs, setting["model"], strict=True) if name == m]
                    for m in models}
        for model, other in _model_pairs(models, baseline):
            try:
                found = intervals.compare_models(by_model[model], by_model[other],
                                                 n_boot=n_boot, seed=seed)
            except ValueError:  # no budget and fold in common
                continue
            lo, hi = found.interval()
            for j, budget in enumerate(found.budgets):
                rows.append({"ways": ways, "shots": shots, "budget": budget, "model": model,
                             "baseline": other, "diff": 100 * found.point[j],
                             "diff_lo": 100 * lo[j], "diff_hi": 100 * hi[j],
                             "runs": found.n_runs[0][j], "baseline_runs": found.n_runs[1][j],
                             "episodes": found.n_episodes[j],
                             "verdict": _verdict(model, other, lo[j], hi[j])})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS), warnings


def _estimate_row(key: tuple[Any, ...], e: BudgetEstimate) -> dict[str, Any]:
    fit = e.fit or PowerLawFit(math.nan, math.nan, math.nan, math.nan, np.array([]))
    return dict(zip(GROUP, key, strict=True)) | {
        "target": 100 * e.target, "target_miou": 100 * e.target_miou, "images": e.images,
        "images_lo": e.images_lo, "images_hi": e.images_hi, "recommended": e.recommended,
        "region": e.region, "point_region": e.point_region, "measured_min": e.measured[0],
        "measured_max": e.measured[1], "refusal": e.refusal, "note": e.note,
        "fit_a": fit.a, "fit_b": fit.b, "fit_c": fit.c, "fit_r2": fit.r2}


def _split(names: Any) -> set[str]:
    if not isinstance(names, str):
        return set()
    return {n.strip() for n in names.split(",") if n.strip()}


def _classes(results: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Classes scored and dropped per fold × ways × shots (from the runs' tags), and a warning
    per setting that dropped any."""
    rows, warnings = [], []
    keys = ["fold", "ways", "shots"]
    for (fold, ways, shots), g in results.groupby(keys, sort=True):
        recorded = g["scored_classes"].notna().any()
        scored = set().union(*map(_split, g["scored_classes"]))
        dropped = set().union(*map(_split, g["dropped_classes"])) - scored
        rows.append({"fold": fold, "ways": ways, "shots": shots,
                     "scored": ", ".join(sorted(scored)) if recorded else None,
                     "dropped": ", ".join(sorted(dropped))})
        if dropped:
            warnings.append(
                f"fold {fold} ({ways}-way {shots}-shot): {', '.join(sorted(dropped))} not scored "
                f"(too few eligible test images): mIoU there averages {len(scored)} of "
                f"{len(scored) + len(dropped)} fold classes")
    return pd.DataFrame(rows, columns=[*keys, "scored", "dropped"]), warnings


def _setting(key: tuple[Any, ...]) -> str:
    model, ways, shots = key
    return f"{model} {ways}-way {shots}-shot"


# --- markdown ---------------------------------------------------------------------------------


def _ci(value: float, lo: float, hi: float, signed: bool = False) -> str:
    if np.isnan(value):
        return "n/a"
    fmt = "+.1f" if signed else ".1f"
    interval = "[n/a]" if np.isnan(lo) else f"[{lo:{fmt}}, {hi:{fmt}}]"
    return f"{value:{fmt}} {interval}"


def _count(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:g}"


TABLE_HEADER = ["model", "ways", "shots", "budget", "labelled images", "mIoU (%) [95 % CI]",
                "Δ to 100 % [CI]", "% of 100 % [CI]", "FB-IoU (%)", "n (runs × episodes)"]
ESTIMATE_HEADER = ["model", "ways", "shots", "target",
                   "images needed: point (optimistic) [95 % CI]", "recommended (upper bound)",
                   "where"]
ESTIMATE_RECOMMENDED = 5  # the column shown in bold
CLASSES_HEADER = ["fold", "ways", "shots", "classes scored", "not scored"]
COMPARISON_HEADER = ["ways", "shots", "budget", "models", "Δ mIoU (points) [95 % CI]",
                     "verdict", "n (runs × episodes)"]


def table_rows(table: pd.DataFrame) -> list[list[str]]:
    """The cells of the per-budget table (`TABLE_HEADER`), as the markdown and HTML show them."""
    rows = []
    for r in table.itertuples():
        n = f"{r.runs} × {_count(r.episodes)}"
        if math.isclose(r.budget, intervals.FULL_BUDGET):
            delta, fraction = "reference", "100"
        else:
            delta = _ci(r.delta, r.delta_lo, r.delta_hi, signed=True)
            fraction = _ci(r.fraction, r.fraction_lo, r.fraction_hi)
        rows.append([str(r.model), str(r.ways), str(r.shots), f"{100 * r.budget:g} %",
                     _count(r.images), _ci(r.miou_mean, r.miou_lo, r.miou_hi), delta, fraction,
                     f"{r.fbiou_mean:.1f}", n])
    return rows


def _images(x: float, measured_max: float) -> str:
    if math.isinf(x):
        return f"> {measured_max:g}"
    return "n/a" if np.isnan(x) else f"{math.ceil(x)}"


def estimate_rows(estimates: pd.DataFrame) -> list[list[str]]:
    """The cells of the estimate table (`ESTIMATE_HEADER`): the labelled images needed for
    90 % / 95 % of full supervision, or why not."""
    rows = []
    for r in estimates.itertuples():
        target = f"{r.target:g} %" + ("" if np.isnan(r.target_miou)
                                      else f" ({r.target_miou:.1f} mIoU)")
        head = [str(r.model), str(r.ways), str(r.shots), target]
        if isinstance(r.refusal, str):
            rows.append([*head, f"no estimate: {r.refusal}", "—", "—"])
            continue
        top = r.measured_max
        rows.append([*head, f"{_images(r.images, top)} [{_images(r.images_lo, top)}, "
                            f"{_images(r.images_hi, top)}]",
                     _images(r.recommended, top), str(r.region)])
    return rows


def classes_rows(classes: pd.DataFrame) -> list[list[str]]:
    """The cells of the classes table (`CLASSES_HEADER`)."""
    return [[str(r.fold), str(r.ways), str(r.shots),
             r.scored if isinstance(r.scored, str) else "n/a (not recorded)",
             r.dropped or "—"] for r in classes.itertuples()]


def comparison_rows(comparisons: pd.DataFrame) -> list[list[str]]:
    """The cells of the model comparison table (`COMPARISON_HEADER`)."""
    return [[str(r.ways), str(r.shots), f"{100 * r.budget:g} %", f"{r.model} − {r.baseline}",
             _ci(r.diff, r.diff_lo, r.diff_hi, signed=True), str(r.verdict),
             f"{r.runs} vs {r.baseline_runs} × {r.episodes}"]
            for r in comparisons.itertuples()]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def table_markdown(table: pd.DataFrame) -> str:
    """The per-budget table: mIoU [95 % CI], Δ to 100 % [CI], % of 100 % [CI], labelled
    images, n (runs × test episodes)."""
    return _markdown(TABLE_HEADER, table_rows(table))


def estimate_markdown(estimates: pd.DataFrame) -> str:
    """The labelled images needed for 90 % / 95 % of full supervision, or why not."""
    rows = estimate_rows(estimates)
    for row, r in zip(rows, estimates.itertuples(), strict=True):
        if not isinstance(r.refusal, str):
            row[ESTIMATE_RECOMMENDED] = f"**{row[ESTIMATE_RECOMMENDED]}**"
    return _markdown(ESTIMATE_HEADER, rows)


def classes_markdown(classes: pd.DataFrame) -> str:
    return _markdown(CLASSES_HEADER, classes_rows(classes))


INTERVALS_NOTE = (
    "Intervals: 95 % hierarchical paired bootstrap ({n_boot} replicates): seeds and test "
    "episodes resampled, each class's IoU recomputed from summed intersections and unions; "
    "every budget shares the episode draw, and Δ / % of 100 % pair runs by seed.")
COMPARISON_NOTE = (
    "Each model against {baseline} (or every pair without it), scored on the same test episodes "
    "(equal test.episodes keys): one episode draw per replicate shared by both models, each "
    "model's seeds drawn on their own (a model run at one seed adds no seed-to-seed spread: "
    "its side of the interval is the test episodes' alone). Each row's interval is 95 % on "
    "its own, not jointly over the rows. A difference whose interval holds 0 is noise.")
FIT_NOTE = ("Fit: mIoU(n) = a − b·n^(−c) over the budgets with labelled images, n = labelled "
            "images, each budget weighted by its interval's half-width; refitted on every "
            "bootstrap replicate. " + BIAS_NOTE)


def to_markdown(summary: Summary | pd.DataFrame) -> str:
    """The whole report (a bare table renders as `table_markdown`)."""
    if isinstance(summary, pd.DataFrame):
        return table_markdown(summary)
    parts = [f"**Warning:** {w}" for w in summary.warnings]
    parts += [
        table_markdown(summary.table),
        INTERVALS_NOTE.format(n_boot=summary.n_boot),
        "### Labelled images needed for 90 % / 95 % of full supervision",
        estimate_markdown(summary.estimates),
        FIT_NOTE]
    if len(summary.comparisons):
        parts += ["### Models compared at each budget",
                  _markdown(COMPARISON_HEADER, comparison_rows(summary.comparisons)),
                  COMPARISON_NOTE.format(baseline=summary.baseline)]
    parts += [
        "### Classes scored per fold",
        classes_markdown(summary.classes)]
    return "\n\n".join(parts)


# --- the plot ---------------------------------------------------------------------------------


def plot(summary: Summary, path: Path, title: str = "mIoU vs labelled images") -> Path:
    """mIoU vs labelled images with 95 % bands and the fitted curves (dashed): 1-way models in
    one panel, K-way ones in another; the top axis shows the budget in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary.table
    multi = pd.to_numeric(table["ways"], errors="coerce").fillna(1) > 1
    panels = [(t, p) for t, p in (("1-way", table[~multi]), ("K-way", table[multi])) if len(p)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6.4 * max(len(panels), 1), 4.4),
                             dpi=120, squeeze=False)
    for ax, (name, part) in zip(axes[0], panels, strict=False):
        _plot_panel(ax, part, summary.fits)
        ax.set_title(f"{title} ({name})" if len(panels) > 1 else title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_panel(ax: Any, table: pd.DataFrame, fits: dict[tuple[Any, ...], PowerLawFit]) -> None:
    by_images = table["images"].notna().all()
    for key, g in table.groupby(GROUP, sort=True):
        g = g.sort_values("budget")
        x = g["images"] if by_images else 100 * g["budget"]
        line, = ax.plot(x, g["miou_mean"], marker="o", label=_setting(key))
        if g["miou_lo"].notna().any():
            ax.fill_between(x, g["miou_lo"], g["miou_hi"], color=line.get_color(), alpha=0.2)
        if by_images and key in fits:
            n = np.geomspace(max(x[x > 0].min(), 1), x.max(), 100)
            ax.plot(n, 100 * fits[key](n), "--", color=line.get_color(), alpha=0.8)
    if by_images:
        _images_axis(ax, table)
    else:
        ax.set_xlabel("labelled training images (% of the training set)")
    ax.set_ylabel("test mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _images_axis(ax: Any, table: pd.DataFrame) -> None:
    """Symmetric-log x axis (budget 0 has no log), and the budgets in % on a top axis."""
    positive = table.loc[table["images"] > 0, "images"]
    if len(positive):
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    ax.set_xlabel("labelled training images (0 = none; dashed: fitted power law)")
    # A twin axis with the same scale and limits, ticked at the measured budgets: matplotlib's
    # secondary_xaxis cannot follow a symlog scale.
    ticks = table.groupby("budget")["images"].mean()
    top = ax.twiny()
    top.set_xscale(ax.get_xscale(), **({"linthresh": float(positive.min())} if len(positive)
                                       else {}))
    top.set_xlim(ax.get_xlim())
    top.set_xticks(ticks.to_numpy(), [f"{100 * b:g} %" for b in ticks.index])
    top.minorticks_off()
    top.set_xlabel("label budget (% of the training images)", fontsize=8)


# --- HTML -------------------------------------------------------------------------------------

HTML_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
.warning { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; }
.note { color: #555; max-width: 60em; }
.run { color: #777; font-size: 12px; }
section.point { border-top: 1px solid #ddd; margin-top: 1.5em; }
img { max-width: 100%; height: auto; }
"""


def _html_table(header: list[str], rows: list[list[str]],
                bold: set[tuple[int, int]] | None = None,
                links: Mapping[tuple[int, int], str] | None = None) -> str:
    """A table of escaped cells; ``bold`` names (row, column) cells shown in bold, ``links``
    maps (row, column) cells to the address they link to."""
    bold, links = bold or set(), links or {}
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            text = html.escape(cell)
            if (i, j) in links:
                text = f'<a href="{html.escape(links[i, j])}">{text}</a>'
            cells.append(f"<td><strong>{text}</strong></td>" if (i, j) in bold
                         else f"<td>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# Overlay grids of noisy images compress badly losslessly (~1 MB a point as PNG): the page
# embeds them as JPEG at this quality, with full colour resolution (4:4:4), ~4x smaller and
# indistinguishable by eye; the lossless PNG stays each run's artifact.
OVERLAY_JPEG_QUALITY = 85


def _img(data: bytes, alt: str, mime: str = "image/png") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{encoded}">'


def _overlay_img(png: bytes, alt: str) -> str:
    """An overlay grid as an embedded JPEG (`OVERLAY_JPEG_QUALITY`); bytes that do not decode
    as an image are embedded as they are."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(png)).convert("RGB")
    except (UnidentifiedImageError, OSError):
        return _img(png, alt)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=OVERLAY_JPEG_QUALITY, subsampling=0)
    return _img(out.getvalue(), alt, "image/jpeg")


def point_name(row: Any) -> str:
    """A point in words, as tasks/fewshot/experiment.py names its runs: `umt 20% seed 1`, plus the
    fold, ways and shots and the budget draw where they are not the defaults."""
    parts = [str(row.model), f"{100 * float(row.budget):g}%"]
    if str(row.fold) != "0":
        parts.append(f"fold {row.fold}")
    if (str(row.ways), str(row.shots)) != ("1", "1"):
        parts.append(f"{row.ways}w{row.shots}s")
    parts.append(f"seed {row.seed}")
    if row.budget_seed is not None and str(row.budget_seed) != str(row.seed):
        parts.append(f"draw {row.budget_seed}")
    return " ".join(parts)


def _sorted_points(results: pd.DataFrame) -> pd.DataFrame:
    """Points by model, ways, shots, budget, fold and seed (numbers as numbers)."""
    def key(col: pd.Series) -> pd.Series:
        as_num = pd.to_numeric(col, errors="coerce")
        return as_num if as_num.notna().all() else col.astype(str)

    cols = [c for c in [*GROUP, "budget", "fold", "seed", "budget_seed"] if c in results]
    return results.sort_values(cols, key=key, kind="stable")


def _point_section(row: Any, found: PointArtifacts | None) -> str:
    name = point_name(row)
    images = "n/a" if pd.isna(row.labels_images) else f"{row.labels_images:g}"
    parts = [f'<section class="point" id="point-{html.escape(str(row.run_id))}">',
             f"<h3>{html.escape(name)}</h3>",
             f"<p>test mIoU {100 * row.miou:.1f} %, FB-IoU {100 * row.fbiou:.1f} %, "
             f"{html.escape(images)} labelled images "
             f'<span class="run">(MLflow run {html.escape(str(row.run_id))})</span></p>']
    if found is None or found.per_class is None:
        parts.append(f"<p>No per-class IoU: the run has no {PER_CLASS_ARTIFACT}.</p>")
    else:
        table = found.per_class
        rows = [[str(c), "n/a" if pd.isna(v) else f"{100 * float(v):.1f}"]
                for c, v in zip(table["class"], table["iou"], strict=True)]
        totals = {i for i, c in enumerate(table["class"]) if c in ("mIoU", "FB-IoU")}
        parts.append(_html_table(["class", "IoU (%)"], rows,
                                 {(i, j) for i in totals for j in range(2)}))
    if found is None or found.overlays is None:
        parts.append(f"<p>No overlays: the run has no {OVERLAYS_ARTIFACT}.</p>")
    else:
        parts.append(_overlay_img(found.overlays, f"test episodes of {name}: supports, "
                                                  "query, prediction and ground truth"))
    parts.append("</section>")
    return "\n".join(parts)


def to_html(summary: Summary, results: pd.DataFrame, plot_png: bytes | None, title: str,
            points: Mapping[str, PointArtifacts] | None = None) -> str:
    """The report as one self-contained HTML page: the warnings, the tables of `to_markdown`,
    the plot, and per point its per-class IoU and overlay grid (``points``, by run id; a point
    without them says so). Images are embedded (base64): the plot as PNG, overlays as JPEG."""
    esc = html.escape
    estimate_bold = {(i, ESTIMATE_RECOMMENDED) for i, r in enumerate(summary.estimates.itertuples())
                     if not isinstance(r.refusal, str)}
    ordered = _sorted_points(_with_columns(results)) if len(results) else results
    body = [f"<h1>{esc(title)}</h1>",
            f"<p>{len(results)} finished points. Scores in %.</p>"]
    body += [f'<p class="warning"><strong>Warning:</strong> {esc(w)}</p>'
             for w in summary.warnings]
    body += ["<h2>mIoU per label budget</h2>",
             _html_table(TABLE_HEADER, table_rows(summary.table)),
             f'<p class="note">{esc(INTERVALS_NOTE.format(n_boot=summary.n_boot))}</p>']
    if plot_png is not None:
        body.append(_img(plot_png, title))
    body += ["<h2>Labelled images needed for 90 % / 95 % of full supervision</h2>",
             _html_table(ESTIMATE_HEADER, estimate_rows(summary.estimates), estimate_bold),
             f'<p class="note">{esc(FIT_NOTE)}</p>']
    if len(summary.comparisons):
        body += ["<h2>Models compared at each budget</h2>",
                 _html_table(COMPARISON_HEADER, comparison_rows(summary.comparisons)),
                 f'<p class="note">{esc(COMPARISON_NOTE.format(baseline=summary.baseline))}</p>']
    body += ["<h2>Classes scored per fold</h2>",
             _html_table(CLASSES_HEADER, classes_rows(summary.classes)),
             "<h2>Points</h2>",
             f'<p class="note">Per point: test IoU per class and test episodes (supports, query, '
             f"prediction, ground truth), embedded as JPEG; the lossless PNG is the run's "
             f"{esc(OVERLAYS_ARTIFACT)}.</p>"]
    if len(ordered):
        index = [[point_name(r), f"{100 * r.miou:.1f}", str(r.run_id)]
                 for r in ordered.itertuples()]
        anchors = {(i, 0): f"#point-{r.run_id}" for i, r in enumerate(ordered.itertuples())}
        body.append(_html_table(["point", "test mIoU (%)", "MLflow run"], index,
                                links=anchors))
        body += [_point_section(r, (points or {}).get(r.run_id)) for r in ordered.itertuples()]
    else:
        body.append("<p>No finished points yet.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(title)}</title>\n<style>{HTML_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# --- files ------------------------------------------------------------------------------------


def write_summary(summary: Summary, results: pd.DataFrame, folder: Path, title: str,
                  points: Mapping[str, PointArtifacts] | None = None) -> dict[str, Path]:
    """summary.csv, summary.md (the whole report), estimate.csv, runs.csv, the plot and
    report.html (`to_html`: all of it in one file, with ``points``' per-class IoU and
    overlays, `load_point_artifacts`)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "summary.csv", "markdown": folder / "summary.md",
             "estimate": folder / "estimate.csv", "runs": folder / "runs.csv",
             "plot": folder / "miou_vs_budget.png", "html": folder / "report.html"}
    summary.table.to_csv(paths["csv"], index=False)
    paths["markdown"].write_text(to_markdown(summary) + "\n")
    summary.estimates.to_csv(paths["estimate"], index=False)
    results.to_csv(paths["runs"], index=False)
    plot(summary, paths["plot"], title)
    paths["html"].write_text(to_html(summary, results, paths["plot"].read_bytes(), title, points),
                             encoding="utf-8")
    return paths


def summary_metrics(summary: Summary) -> dict[str, float]:
    """Flat metrics for the parent run: ``summary/<model>/<w>w<s>s/b<budget>/miou`` (and
    ``_lo``/``_hi``), ``compare/<model>-<baseline>/<w>w<s>s/b<budget>/diff`` (and
    ``_lo``/``_hi``), ``estimate/<model>/<w>w<s>s/images_90`` (and ``_lo``/``_hi``); finite
    values only (an unbounded upper end or a refused estimate is not logged)."""
    out = {}
    for r in summary.table.itertuples():
        prefix = f"summary/{r.model}/{r.ways}w{r.shots}s/b{r.budget:g}"
        out |= {f"{prefix}/miou": r.miou_mean, f"{prefix}/miou_lo": r.miou_lo,
                f"{prefix}/miou_hi": r.miou_hi}
    for r in summary.comparisons.itertuples():
        prefix = f"compare/{r.model}-{r.baseline}/{r.ways}w{r.shots}s/b{r.budget:g}"
        out |= {f"{prefix}/diff": r.diff, f"{prefix}/diff_lo": r.diff_lo,
                f"{prefix}/diff_hi": r.diff_hi}
    for r in summary.estimates.itertuples():
        prefix = f"estimate/{r.model}/{r.ways}w{r.shots}s/images_{r.target:g}"
        out |= {prefix: r.images, f"{prefix}_lo": r.images_lo, f"{prefix}_hi": r.images_hi}
    return {k: float(v) for k, v in out.items() if np.isfinite(v)}
