"""MLflow tracking: where runs go, and batched logging of params, metrics and artifacts.

Default tracking URI: `sqlite:///mlflow.db` in the working folder (MLflow 3 refuses the file
store), artifacts in `./mlartifacts`. `MLFLOW_TRACKING_URI` points everything at a server. The
SQLite DB and the experiment are created under a file lock beside the DB: several processes
migrating a fresh DB at once fail (`duplicate column name`, docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MODEL_URI_TAG = "fss.model_uri"
# What a point was tested on (`tasks/fewshot/experiment.py` writes them, the report reads them):
# the classes scored and dropped, and the test episodes' key (`EvalResult.test_key`).
TEST_CLASSES_TAG = "test.classes"
TEST_DROPPED_TAG = "test.dropped_classes"
TEST_EPISODES_TAG = "test.episodes"
SYSTEM_METRICS_LOGGER = "mlflow.system_metrics"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with the URI in the message, when a tracking server does not answer.

    MLflow's own client retries with backoff for minutes before giving up; a sweep should stop
    before any expensive work instead.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            if r.status == 200:
                return
            reason = f"HTTP {r.status}"
    except OSError as exc:
        reason = str(getattr(exc, "reason", exc))
    raise RuntimeError(f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                       "(infra/mlflow) or unset MLFLOW_TRACKING_URI to use the local SQLite store")


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """Create (once) and return the experiment id; fails fast when the backend is unreachable."""
    uri = uri or tracking_uri()
    check_reachable(uri)  # before importing mlflow, which alone takes seconds
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    location, lock = None, contextlib.nullcontext()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///")).absolute()
        location = (db.parent / DEFAULT_ARTIFACTS).as_uri()  # beside the DB, whatever the cwd
        # The first access migrates a fresh DB; two processes migrating at once corrupt it
        # (docs/architecture.md), so creation is serialised across processes.
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{db}.lock")
    with lock:
        try:
            exp = client.get_experiment_by_name(name)
        except Exception as exc:  # noqa: BLE001 - any backend failure: stop before training
            raise RuntimeError(f"MLflow tracking at {uri} is unreachable: {exc}") from exc
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(name, artifact_location=location)


PROJECT_DIR = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    """The commit checked out in the project (None outside a git checkout, e.g. the image)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def code_version() -> str:
    """The git commit of the code (with `-dirty` for local changes), or the package version."""
    sha = git_commit()
    if sha is None:
        from importlib.metadata import version

        return version("fewshot-budget")
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=PROJECT_DIR, capture_output=True, text=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def source_tags() -> dict[str, str]:
    """MLflow's own source tags (the runs table's Source column): the project and its commit."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": str(PROJECT_DIR)}
    sha = git_commit()
    if sha:
        tags["mlflow.source.git.commit"] = sha
    return tags


def runs_url(ui_url: str, experiment_id: str) -> str:
    """The experiment's runs table in the MLflow UI. MLflow 3.17 opens the GenAI overview at the
    root and on a bare experiment page; the classic runs table needs the workflow type."""
    return (f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
            "?workflowType=machine_learning")


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at `uri` for calls that only use it
    (mlflow.pytorch.log_model), then put it back: `mlflow.set_tracking_uri` also writes
    MLFLOW_TRACKING_URI, which later code (and tests) must find as it was."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unset: MLflow resolves the variable again
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


@contextlib.contextmanager
def _quiet(logger: str, level: int = logging.ERROR) -> Iterator[None]:
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)


class Tracker:
    """One MLflow run. Metrics are buffered and sent with `log_batch` (one call per flush),
    since logging them one by one over HTTP costs ~20 ms each."""

    def __init__(self, experiment: str, *, run_id: str | None = None,
                 run_name: str | None = None, tags: Mapping[str, str] | None = None,
                 parent_run_id: str | None = None, flush_every: int = 200):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri()
        self.client = MlflowClient(self.uri)
        self.experiment_id = ensure_experiment(experiment, self.uri)
        all_tags = source_tags() | dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            run_id = run.info.run_id
        self.run_id = run_id
        self._metrics: list[Any] = []
        self._flush_every = flush_every
        self._system_monitor: Any = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self._metrics) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        while self._metrics:
            chunk, self._metrics = self._metrics[:1000], self._metrics[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.flush()
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model: Any, name: str = "model",
                  metadata: Mapping[str, Any] | None = None) -> str:
        """`model` as an MLflow PyTorch model of this run; returns its `models:/` URI, also kept
        in the run's `fss.model_uri` tag. Pickled with the `models/` code beside it: our models
        take an episode (several tensors and `n_ways`), which the default torch.export format
        cannot take from one input example (docs/architecture.md). Load with
        mlflow.pytorch.load_model."""
        import mlflow
        import torch

        self.flush()
        # "pickle can run code" is logged as a warning on every call: we know, the code is ours.
        # Created here, in the run's experiment: log_model alone would create it in MLflow's
        # active experiment (Default, artifacts under ./mlruns).
        logged = self.client.create_logged_model(self.experiment_id, name=name,
                                                 source_run_id=self.run_id)
        with fluent_tracking_uri(self.uri), _quiet("mlflow.pytorch"):
            info = mlflow.pytorch.log_model(
                model, name=name, run_id=self.run_id, model_id=logged.model_id,
                serialization_format="pickle",
                code_paths=[str(PROJECT_DIR / "models")], metadata=dict(metadata or {}),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"])
        self.set_tags({MODEL_URI_TAG: info.model_uri})
        return info.model_uri

    def start_system_metrics(self) -> None:
        """Log MLflow system metrics to this run until `finish`: CPU
        (`system/cpu_utilization_percentage`), memory, disk, network and (with nvidia-ml-py
        installed) GPU use, averaged every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds
        (MLflow's default: 10). A resumed run continues its steps. MLflow's monitor drops the
        sample of an interval cut short by the end; `finish` logs it, so that a point shorter
        than one interval still has its values."""
        import importlib.util

        if self._system_monitor is not None:
            return
        if importlib.util.find_spec("psutil") is None:
            raise RuntimeError("system metrics need psutil: pip install psutil")
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        with _quiet(SYSTEM_METRICS_LOGGER, logging.WARNING):  # "Skip logging GPU metrics" etc.
            monitor = SystemMetricsMonitor(self.run_id, resume_logging=True,
                                           tracking_uri=self.uri)
            monitor.start()
        self._system_monitor = monitor

    def _stop_system_metrics(self) -> None:
        monitor, self._system_monitor = self._system_monitor, None
        if monitor is None:
            return
        with _quiet(SYSTEM_METRICS_LOGGER, logging.WARNING):
            monitor.finish()  # joins the sampling thread
        if any(m.metrics for m in monitor.monitors):  # sampled, not yet logged
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()

    def finish(self, status: str = "FINISHED") -> None:
        self._stop_system_metrics()
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def register_model(model_uri: str, name: str, alias: str, run_id: str | None = None) -> str:
    """Register a logged model under `name` and point `alias` at it; returns the version. A
    rerun that chooses the same model keeps the version the alias already names."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    # Our client resolves the logged model: MLflow's registry would look a `models:/` source up
    # through the process-wide tracking URI, not this client's.
    model_id = model_uri.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    try:
        current = client.get_model_version_by_alias(name, alias)
        if current.source == logged.artifact_location:
            return str(current.version)
    except MlflowException:
        pass  # no such model or alias yet
    try:
        client.create_registered_model(name, description="fss: few-shot segmentation models; "
                                                          "one alias per label-budget study")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=logged.artifact_location,
                                          run_id=run_id or logged.source_run_id,
                                          model_id=model_id)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)
