"""Ablation summaries read back from MLflow: a table (mean ± std) and a plot of mIoU vs budget.

The flow and `fss report` share this code, and it reads only MLflow, so it works the same on a
finished study and on one that is still running.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

STUDY_TAG = "fss.study"
KIND_TAG = "fss.kind"
TAG_COLUMNS = ["model", "budget", "fold", "shots", "ways", "seed"]


def parent_run(experiment: str, study: str | None = None) -> Any | None:
    """The latest ablation parent run of an experiment (of one study, if named)."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import tracking_uri

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


def child_results(parent_run_id: str) -> pd.DataFrame:
    """One row per finished child run: its tags and its test metrics."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=5000)
    rows = []
    for r in runs:
        if "test/miou" not in r.data.metrics:
            continue  # still training, or failed
        row = {c: r.data.tags.get(c) for c in TAG_COLUMNS}
        row |= {"miou": r.data.metrics["test/miou"], "fbiou": r.data.metrics["test/fbiou"],
                "run_id": r.info.run_id}
        rows.append(row)
    df = pd.DataFrame(rows, columns=[*TAG_COLUMNS, "miou", "fbiou", "run_id"])
    df["budget"] = df["budget"].astype(float)
    return df


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds and folds per model × ways × shots × budget (mIoU in %)."""
    keys = ["model", "ways", "shots", "budget"]
    if results.empty:
        return pd.DataFrame(columns=[*keys, "miou_mean", "miou_std", "fbiou_mean", "runs"])
    g = results.groupby(keys)
    table = g.agg(miou_mean=("miou", "mean"), miou_std=("miou", "std"),
                  fbiou_mean=("fbiou", "mean"), runs=("miou", "size")).reset_index()
    table["miou_std"] = table["miou_std"].fillna(0.0)
    for col in ("miou_mean", "miou_std", "fbiou_mean"):
        table[col] = 100 * table[col]
    return table.sort_values(keys).reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| model | ways | shots | budget | mIoU (%) | FB-IoU (%) | runs |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in table.itertuples():
        lines.append(f"| {r.model} | {r.ways} | {r.shots} | {100 * r.budget:g} % | "
                     f"{r.miou_mean:.1f} ± {r.miou_std:.1f} | {r.fbiou_mean:.1f} | {r.runs} |")
    return "\n".join(lines)


def plot(table: pd.DataFrame, path: Path, title: str = "mIoU vs label budget") -> Path:
    """One line per model (and ways/shots setting), error bars = std over seeds and folds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for (model, ways, shots), g in table.groupby(["model", "ways", "shots"]):
        g = g.sort_values("budget")
        ax.errorbar(100 * g["budget"], g["miou_mean"], yerr=g["miou_std"], marker="o",
                    capsize=3, label=f"{model} {ways}-way {shots}-shot")
    ax.set_xlabel("labelled training images (%)")
    ax.set_ylabel("test mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_summary(results: pd.DataFrame, folder: Path, title: str) -> dict[str, Path]:
    """Table as CSV and markdown, and the plot; returns the paths."""
    table = summarize(results)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "summary.csv", "markdown": folder / "summary.md",
             "plot": folder / "miou_vs_budget.png", "runs": folder / "runs.csv"}
    table.to_csv(paths["csv"], index=False)
    paths["markdown"].write_text(to_markdown(table) + "\n")
    results.to_csv(paths["runs"], index=False)
    plot(table, paths["plot"], title)
    return paths
