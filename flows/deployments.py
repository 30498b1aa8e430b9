"""Prefect deployments: the flows `prefect.yaml` points at, and what `fss deploy` applies it with.

Deployment parameters must be JSON, and flows that fan out need a Dask task runner chosen where
they run, so each data stage and study gets a thin wrapper flow here: it takes JSON parameters
(a config *path* instead of a parsed study), builds the runner on the worker host (a
LocalCluster, or `FSS_DASK_ADDRESS` when the worker's environment names a scheduler) and calls
the real flow as a subflow. Relative paths resolve against the project directory, where the
`pull` step of `prefect.yaml` puts every flow run (`FSS_PROJECT_DIR` on the worker).

`fss deploy` ensures a Prefect API, creates the work pools, runs `prefect deploy --all` and can
start workers:

    fss deploy                      # pools + every deployment in prefect.yaml
    fss deploy --worker fss-cpu     # ... then serve the CPU pool here until Ctrl-C
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from tasks import defaults
from tasks.defaults import PREFECT_FILE, PROJECT_DIR

PROJECT_DIR_ENV = "FSS_PROJECT_DIR"
POOLS = defaults.WORK_POOLS


# --- wrapper flows (entrypoints of prefect.yaml) -------------------------------------------
# Every deployment is `fss-<stage>/<dataset>` (scheduled ones: `nightly-<dataset>`), and each
# flow run is named by what it works on: `ingest synth`, `ablation synthetic-budget`.

def _train_run_name() -> str:
    from prefect.runtime import flow_run

    return f"train {Path(flow_run.parameters['config_path']).stem}"


def _study_run_name() -> str:
    """`ablation <study>`, the study named in the file (its file name when unreadable)."""
    import yaml
    from prefect.runtime import flow_run

    path = Path(flow_run.parameters["config_path"])
    try:
        name = (yaml.safe_load(path.read_text()) or {}).get("study") or path.stem
    except (OSError, yaml.YAMLError):
        name = path.stem
    return f"ablation {name}"


@flow(name="fss-ingest", flow_run_name="ingest {name}")
def ingest_deployment(source: str = "voc", root: str = f"{defaults.SYNTH_OUT}/voc",
                      store_url: str = defaults.STORE, name: str = "synth",
                      splits: list[str] | None = None, size: int = defaults.INGEST_SIZE,
                      shard_size: int = defaults.SHARD_SIZE, classes_file: str | None = None,
                      list_file: str | None = None, workers: int = defaults.WORKERS,
                      dask_address: str | None = None,
                      resize: str = defaults.RESIZE) -> dict[str, Any]:
    """Ingest a VOC- or COCO-format dataset into the store (runs of shards on Dask)."""
    from flows.ingest import run_ingest

    return run_ingest(workers=workers, dask_address=dask_address, source=source,
                      root=str(Path(root).resolve()), store_url=store_url, name=name,
                      splits=splits, size=size, shard_size=shard_size,
                      classes_file=classes_file, list_file=list_file, progress=False,
                      resize=resize)


@flow(name="fss-features", flow_run_name="features {name}")
def features_deployment(store_url: str = defaults.STORE, name: str = "synth",
                        embedder: dict[str, Any] | None = None, version: str | None = None,
                        batch_size: int = defaults.FEATURES_BATCH, gpu: bool = False,
                        workers: int = defaults.WORKERS,
                        dask_address: str | None = None) -> dict[str, Any]:
    """Embed every image of a dataset with a frozen embedder (default: random small ResNet)."""
    from flows.features import run_features

    embedder = embedder or defaults.default_embedder()
    return run_features(workers=workers, dask_address=dask_address, gpu=gpu,
                        store_url=store_url, name=name, embedder=embedder, version=version,
                        batch_size=batch_size, progress=False)


@flow(name="fss-pseudo", flow_run_name="pseudo masks {name}")
def pseudo_deployment(store_url: str = defaults.STORE, name: str = "synth",
                      features_key: str | None = None, embedder: dict[str, Any] | None = None,
                      version: str | None = None, k: int = defaults.PSEUDO_K,
                      seed: int = defaults.SEED, report: bool = True,
                      report_dir: str = defaults.REPORT_DIR, experiment: str | None = None,
                      gpu: bool = False, workers: int = defaults.WORKERS,
                      dask_address: str | None = None) -> dict[str, Any]:
    """Pseudo masks by k-means of pixel features; runs the features first given an embedder."""
    from flows.pseudo import run_pseudo

    if features_key is None and embedder is None:
        embedder = defaults.default_embedder()
    return run_pseudo(workers=workers, dask_address=dask_address, embedder=embedder,
                      features_key=features_key, gpu=gpu, store_url=store_url, name=name,
                      version=version, k=k, seed=seed, report=report, report_dir=report_dir,
                      experiment=experiment, progress=False)


@flow(name="fss-pretrain", flow_run_name="pretrain {dataset}")
def pretrain_deployment(store_url: str = defaults.STORE, dataset: str = "synth",
                        out_dir: str = "runs/pretrain/synth",
                        steps: int = defaults.PRETRAIN_STEPS,
                        batch_size: int = defaults.PRETRAIN_BATCH,
                        lr: float = defaults.PRETRAIN_LR, seed: int = defaults.SEED,
                        image_size: int | None = None) -> dict[str, Any]:
    """Self-supervised dense pretraining of the backbone on a dataset's unlabelled images."""
    from flows.pretrain import pretrain_flow

    return pretrain_flow(store_url, dataset, out_dir, steps=steps, batch_size=batch_size, lr=lr,
                         seed=seed, image_size=image_size, progress=False)


@flow(name="fss-train", flow_run_name=_train_run_name)
def train_deployment(config_path: str = "configs/synthetic.yaml",
                     overrides: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate one config file (`--set`-style `key=value` overrides)."""
    from flows.train import train_flow
    from tasks.fewshot.config import load_config

    cfg = load_config(config_path, overrides or [])
    return train_flow(cfg, progress=False)


@flow(name="fss-ablation", flow_run_name=_study_run_name)
def ablation_deployment(config_path: str = "configs/ablation-synthetic.yaml",
                        overrides: list[str] | None = None, out_dir: str = defaults.REPORT_DIR,
                        workers: int = defaults.ABLATION_WORKERS,
                        dask_address: str | None = None) -> dict[str, Any]:
    """Run (or resume) the label-budget study of a YAML file; finished points are read back."""
    from flows.ablate import run_ablation
    from tasks.study.ablation import load_study

    path = Path(config_path)
    if not path.exists():
        raise FileNotFoundError(f"study file {path.resolve()} does not exist")
    study = load_study(path, overrides or [])  # every point, before a cluster starts
    return run_ablation(study.spec, workers=workers, dask_address=dask_address,
                        overrides=overrides or [], out_dir=out_dir, progress=False)


# --- applying prefect.yaml -------------------------------------------------------------------

def ensure_pools(api_url: str, pools: dict[str, str] | None = None) -> list[str]:
    """Create the `process` work pools that are missing; returns the names created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    created = []
    with temporary_settings(updates={PREFECT_API_URL: api_url}), \
            get_client(sync_client=True) as client:
        for name, description in (pools or POOLS).items():
            try:
                client.read_work_pool(name)
                continue
            except ObjectNotFound:
                pass
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", description=description,
                base_job_template=ProcessWorker.get_default_base_job_template()))
            created.append(name)
    return created


def _env(api_url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api_url, **extra}


def deploy_all(api_url: str, prefect_file: Path = PREFECT_FILE,
               timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    """`prefect deploy --all --no-prompt` from the project directory (entrypoints are relative
    to it); raises RuntimeError with the CLI's output when a deployment is refused."""
    cmd = [sys.executable, "-m", "prefect", "deploy", "--all", "--no-prompt",
           "--prefect-file", str(prefect_file)]
    # COLUMNS: the CLI wraps its table to the terminal; keep error lines whole in logs.
    done = subprocess.run(cmd, cwd=PROJECT_DIR, env=_env(api_url, COLUMNS="200"),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({done.returncode}):\n{done.stdout}\n"
                           f"{done.stderr}")
    return done


def start_worker(pool: str, api_url: str, *, limit: int | None = None,
                 project_dir: Path = PROJECT_DIR, log: Path | None = None,
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """`prefect worker start --pool POOL` in its own process group (stop: runtime.stop_process).

    The worker's flow runs inherit its environment: the API URL, and `FSS_PROJECT_DIR` that the
    `pull` step of prefect.yaml changes into.
    """
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
           "--type", "process", "--install-policy", "never", "--no-create-pool-if-not-found"]
    if limit:
        cmd += ["--limit", str(limit)]
    env = _env(api_url, **{PROJECT_DIR_ENV: str(project_dir)}, **(extra_env or {}))
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(cmd, env=env, cwd=project_dir, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        if log:
            out.close()


def deployment_names(api_url: str) -> dict[str, dict[str, Any]]:
    """`flow/deployment` → pool, schedules (cron, timezone) and parameters, as the API has them."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out: dict[str, dict[str, Any]] = {}
    with temporary_settings(updates={PREFECT_API_URL: api_url}), \
            get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        for d in client.read_deployments():
            crons = [{"cron": getattr(s.schedule, "cron", None),
                      "timezone": getattr(s.schedule, "timezone", None), "active": s.active}
                     for s in d.schedules]
            limit = d.global_concurrency_limit
            strategy = getattr(d.concurrency_options, "collision_strategy", None)
            out[f"{flows[d.flow_id]}/{d.name}"] = {
                "id": str(d.id), "work_pool": d.work_pool_name, "schedules": crons,
                "parameters": d.parameters, "pull_steps": d.pull_steps,
                "concurrency": None if limit is None else {
                    "limit": limit.limit, "active": limit.active,
                    "collision_strategy": getattr(strategy, "value", strategy)}}
    return out
