"""Fault tolerance with real processes on 127.0.0.1: Dask workers, whole flows and training runs
are killed with SIGKILL mid-way, and the rerun (or the surviving cluster) must finish with
exactly the result of an uninterrupted run.

Every process a test starts is stopped by that test (``finally`` blocks), and a test fails when
a killed run leaves processes behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tasks.data import ingest, store
from tasks.data.readers import make_reader
from tasks.labelfree import features

# Register "faults" in pyproject's markers, then add pytest.mark.faults here.
pytestmark = [pytest.mark.slow, pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[1]
FSS = [sys.executable, "-m", "flows.cli"]
NAME = "synth"
SIZE = 64
SHARD = 4  # 56 images -> 14 shards: enough tasks to kill a worker while most are pending
EMBEDDER = {"kind": "backbone", "backbone": "small_resnet", "layer": "layer4",
            "checkpoint": None}
TINY_MODEL = {"embed_dim": 16, "global_dim": 32, "local_dim": 16}
# Dask workers that take longer per shard (tests/slow_shards.py), so a kill lands mid-run.
SLOW_WORKERS = {"DASK_DISTRIBUTED__WORKER__PRELOAD": repr([str(ROOT / "tests" / "slow_shards.py")])}


# ------------------------------------------------------------------------------------ helpers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    """The child environment: quiet, one torch thread (a shared 2-core box), loopback only."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
           "DASK_LOGGING__DISTRIBUTED": "warning", "PYTHONUNBUFFERED": "1"}
    env.pop("FSS_DASK_ADDRESS", None)
    env.update(extra)
    return env


def _wait_for(what: str, check: Callable[[], bool], timeout: float,
              proc: subprocess.Popen | None = None, every: float = 0.05) -> None:
    """Poll `check` until true; fail after `timeout` s or when `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # e.g. the store is not created yet
            if check():
                return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, wait: float = 15.0) -> None:
    """Signal a child started with start_new_session (its pid is its process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(wait)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(wait)


def _stop(proc: subprocess.Popen) -> None:
    """Graceful stop (SIGTERM), then SIGKILL of the whole group."""
    if proc.poll() is None:
        _kill_group(proc, signal.SIGTERM, wait=10)
    with contextlib.suppress(ProcessLookupError):  # grandchildren that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)


def _kill_when(cmd: list[str], log: Path, env: dict[str, str], cwd: Path, what: str,
               check: Callable[[], bool], timeout: float) -> list[str]:
    """Run `cmd`, SIGKILL its process group once `check()` holds; the descendants that
    outlived the kill (described) come back, so a test can assert nothing leaked."""
    proc = _spawn(cmd, log, env, cwd)
    family: list[psutil.Process] = []
    try:
        _wait_for(what, check, timeout, proc)
        family = _descendants(proc.pid)  # the Prefect server, the Dask worker(s), ...
        _kill_group(proc)
    finally:
        _stop(proc)
        survivors = _reap(family)
    return survivors


def _descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def _reap(procs: list[psutil.Process], timeout: float = 10.0) -> list[str]:
    """Wait for processes to die; kill and describe the ones still alive after `timeout`."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    survivors = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            survivors.append(f"pid {p.pid} (pgid {os.getpgid(p.pid)}): "
                             f"{' '.join(p.cmdline())[:160]}")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(p.pid) == p.pid:  # a group leader (setsid): take its group
                    os.killpg(p.pid, signal.SIGKILL)
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return survivors


def _spawn(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 - the child owns it; closed with the test's tmp dir
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    """Run to completion (own process group, killed on timeout); returns stdout + stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _stop(proc)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}"
    return out


def _checksums(folder: Path) -> dict[str, str]:
    """sha256 of every chunk file (zarr.json holds attributes, not array data)."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "zarr.json"}


def _voc(synth_root: Path) -> Path:
    # The CLI resolves --root; items (and so the version) must see the same paths here.
    return synth_root.resolve() / "voc"


def _plan(synth_root: Path) -> ingest.IngestPlan:
    readers = [make_reader("voc", _voc(synth_root), s) for s in ("train", "val")]
    return ingest.plan_ingest(readers, NAME, size=SIZE, shard_size=SHARD)


def _clean_ingest(synth_root: Path, url: str) -> str:
    """The reference: every shard written in this process, no Prefect, no Dask."""
    plan = _plan(synth_root)
    assert ingest.ingest_plan(plan, url)["complete"]
    return plan.spec.version


def _version_dir(url: str, version: str) -> Path:
    return Path(url) / "datasets" / NAME / version


@contextlib.contextmanager
def dask_cluster(n_workers: int, logs: Path, env: dict[str, str]
                 ) -> Iterator[tuple[str, dict[str, subprocess.Popen]]]:
    """A real `dask scheduler` and `n_workers` single-threaded `dask worker`s on 127.0.0.1.

    No nanny: a worker killed with SIGKILL stays dead, so the flow must finish on the others.
    Yields the scheduler address and the worker processes by their address.
    """
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    workers: dict[str, subprocess.Popen] = {}
    try:
        procs.append(_spawn([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1",
                             "--port", str(port), "--no-dashboard"],
                            logs / "scheduler.log", env, ROOT))
        for i in range(n_workers):
            wport = _free_port()
            workers[f"tcp://127.0.0.1:{wport}"] = _spawn(
                [sys.executable, "-m", "dask", "worker", address, "--nthreads", "1",
                 "--no-nanny", "--host", "127.0.0.1", "--worker-port", str(wport),
                 "--no-dashboard", "--name", f"fault-{i}", "--death-timeout", "60"],
                logs / f"worker-{i}.log", env, ROOT)
            procs.append(workers[f"tcp://127.0.0.1:{wport}"])
        with Client(address, timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=90)
        yield address, workers
    finally:
        for proc in reversed(procs):  # workers first: they would wait for a lost scheduler
            _stop(proc)


class WorkerKiller(threading.Thread):
    """Kills (SIGKILL) one worker that has work in flight, once `ready()` says so."""

    def __init__(self, address: str, workers: dict[str, subprocess.Popen],
                 ready: Callable[[], bool], timeout: float = 240.0):
        super().__init__(daemon=True)
        self.address, self.workers, self.ready, self.timeout = address, workers, ready, timeout
        self.killed: str | None = None
        self.in_flight: list[str] = []
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        from distributed import Client

        deadline = time.monotonic() + self.timeout
        try:
            with Client(self.address, timeout=30) as client:
                while not self.stop.is_set() and time.monotonic() < deadline:
                    ok = False
                    with contextlib.suppress(Exception):  # store not created yet
                        ok = self.ready()
                    if ok:
                        busy = {w: keys for w, keys in client.processing().items() if keys}
                        victim = next((w for w in self.workers if w in busy), None)
                        if victim is not None:
                            os.killpg(self.workers[victim].pid, signal.SIGKILL)
                            self.workers[victim].wait(15)
                            self.killed, self.in_flight = victim, [str(k) for k in busy[victim]]
                            return
                    time.sleep(0.05)
            self.error = "no worker was busy once the first shards were done"
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = repr(exc)


# --------------------------------------------------------------- (a) a Dask worker, mid-ingest

@pytest.mark.timeout(420)
def test_ingest_survives_a_killed_dask_worker(synth_root: Path, tmp_path: Path,
                                              prefect_api_url: str) -> None:
    from flows.ingest import run_ingest
    from flows.runtime import prefect_api

    clean_url, flow_url = str(tmp_path / "clean.zarr"), str(tmp_path / "flow.zarr")
    version = _clean_ingest(synth_root, clean_url)
    n_shards = _plan(synth_root).spec.n_shards
    env = _env(PREFECT_API_URL=prefect_api_url, **SLOW_WORKERS)
    with dask_cluster(2, tmp_path, env) as (address, workers):
        killer = WorkerKiller(address, workers, lambda: 1 <= len(
            store.done_shards(flow_url, NAME, version)) < n_shards - 2)
        killer.start()
        try:
            with prefect_api():
                summary = run_ingest(dask_address=address, source="voc",
                                     root=str(_voc(synth_root)), store_url=flow_url, name=NAME,
                                     size=SIZE, shard_size=SHARD, progress=False)
        finally:
            killer.stop.set()
            killer.join(30)
        assert killer.killed, f"no worker was killed: {killer.error}"
        survivors = [a for a, p in workers.items() if p.poll() is None]
        assert survivors and killer.killed not in survivors
    # A shard finished on the killed worker has lost its result: Dask reruns the task, which
    # finds the shard's done flag and skips it, so written + skipped covers every shard.
    assert summary["complete"], summary
    assert summary["shards_written"] + summary["shards_skipped"] == n_shards, summary
    assert summary["ingested"] == summary["listed"] == 56
    assert _checksums(_version_dir(flow_url, version)) == _checksums(
        _version_dir(clean_url, version))


# ----------------------------------------------------- (b) a Dask worker, mid feature extraction

def _seeded_embedder(path: Path) -> dict[str, Any]:
    """The brief's small_resnet spec, with fixed weights from a checkpoint file.

    With ``"checkpoint": None`` every process draws its own random weights (see
    test_random_init_embedder_is_the_same_in_every_process), which no crash test can compare.
    """
    import torch

    from models.backbones import build_backbone

    torch.manual_seed(0)
    torch.save(build_backbone("small_resnet").state_dict(), path)
    return EMBEDDER | {"checkpoint": str(path)}


@pytest.mark.timeout(420)
def test_features_survive_a_killed_dask_worker(synth_root: Path, tmp_path: Path,
                                               prefect_api_url: str) -> None:
    from flows.features import run_features
    from flows.runtime import prefect_api

    spec = _seeded_embedder(tmp_path / "small_resnet.pt")
    clean_url, flow_url = str(tmp_path / "clean.zarr"), str(tmp_path / "flow.zarr")
    version = _clean_ingest(synth_root, clean_url)
    _clean_ingest(synth_root, flow_url)
    plan = features.plan_features(clean_url, NAME, spec)
    features.create_features(plan)
    for k in range(plan.n_shards):  # the reference, in this process (one torch thread)
        features.extract_shard(clean_url, NAME, version, plan.key, k, spec)

    env = _env(PREFECT_API_URL=prefect_api_url, **SLOW_WORKERS)
    with dask_cluster(2, tmp_path, env) as (address, workers):
        killer = WorkerKiller(address, workers, lambda: 1 <= len(store.done_shards(
            flow_url, NAME, version, derived=plan.key)) < plan.n_shards - 2)
        killer.start()
        try:
            with prefect_api():
                summary = run_features(dask_address=address, store_url=flow_url, name=NAME,
                                       embedder=spec, progress=False)
        finally:
            killer.stop.set()
            killer.join(30)
        assert killer.killed, f"no worker was killed: {killer.error}"
    # images counts what this run embedded: a shard whose result died with the worker is
    # rerun as a skip (its done flag is set), so it may count fewer than 56.
    assert summary["complete"] and 0 < summary["images"] <= 56, summary
    assert summary["key"] == plan.key
    derived = Path("derived") / plan.key
    assert _checksums(_version_dir(flow_url, version) / derived) == _checksums(
        _version_dir(clean_url, version) / derived)


@pytest.mark.timeout(120)
def test_random_init_embedder_is_the_same_in_every_process(tmp_path: Path) -> None:
    code = ("import hashlib; from tasks.labelfree.features import get_embedder; "
            f"e = get_embedder({EMBEDDER!r}); "
            "print(hashlib.sha256(next(e.net.parameters()).numpy().tobytes()).hexdigest())")
    digests = {_run([sys.executable, "-c", code], _env(), tmp_path, 60).split()[-1]
               for _ in range(2)}
    assert len(digests) == 1, "two processes built different weights for the same features key"


# ------------------------------------------------ (c) the whole `fss ingest`, killed and rerun

@pytest.mark.timeout(480)
def test_killed_ingest_cli_resumes_and_leaves_nothing_behind(synth_root: Path,
                                                             tmp_path: Path) -> None:
    clean_url, url = str(tmp_path / "clean.zarr"), str(tmp_path / "cli.zarr")
    version = _clean_ingest(synth_root, clean_url)
    n_shards = _plan(synth_root).spec.n_shards
    # No PREFECT_API_URL: the CLI starts (and must clean up) its own temporary server.
    env = _env(FSS_HOME=str(tmp_path / "fss-home"), **SLOW_WORKERS)
    env.pop("PREFECT_API_URL", None)
    cmd = [*FSS, "ingest", "--source", "voc", "--root", str(_voc(synth_root)), "--name", NAME,
           "--store", url, "--size", str(SIZE), "--shard-size", str(SHARD), "--workers", "1"]
    survivors = _kill_when(cmd, tmp_path / "killed.log", env, tmp_path, "two finished shards",
                           lambda: len(store.done_shards(url, NAME, version)) >= 2, 240)
    done_at_kill = len(store.done_shards(url, NAME, version))
    assert done_at_kill < n_shards, "the run finished before it could be killed"

    out = _run(cmd, env, tmp_path, timeout=240)
    m = re.search(r"(\d+) shards written, (\d+) already complete", out)
    assert m, out
    written, skipped = int(m[1]), int(m[2])
    assert skipped >= done_at_kill > 0 and written + skipped == n_shards, out
    assert "ingested 56 + quarantined 0 = 56 of 56 listed" in out
    assert _checksums(_version_dir(url, version)) == _checksums(_version_dir(clean_url, version))
    assert not survivors, "processes of the killed run outlived it:\n" + "\n".join(survivors)


# ------------------------------------------------------------- (d) `fss train`, killed and rerun

def _train_config(tiny_store: str, out: Path, **kw: Any) -> dict[str, Any]:
    cfg = dict(model="metasegnet", store=tiny_store, dataset=NAME, fold=0, steps=12,
               batch_size=2, checkpoint_every=2, val_every=4, val_episodes=2, test_episodes=4,
               test_shots=[1], min_pixels=64, model_args=TINY_MODEL, experiment="faults",
               out_dir=str(out), threads=1, device="cpu")
    return cfg | kw


@pytest.mark.timeout(480)
def test_killed_training_resumes_to_identical_weights(tiny_store: str, tmp_path: Path,
                                                      prefect_api_url: str) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    from tasks.fewshot.config import from_dict
    from tasks.fewshot.training import load_state, train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _env(PREFECT_API_URL=prefect_api_url, MLFLOW_TRACKING_URI=uri)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": _train_config(tiny_store, tmp_path / "runs")}))
    cmd = [*FSS, "train", "--config", str(config)]
    _kill_when(cmd, tmp_path / "killed.log", env, tmp_path, "the first checkpoint",
               lambda: any((tmp_path / "runs").glob("*/checkpoints/last.pt")), 240)
    (run_dir,) = (tmp_path / "runs").iterdir()
    killed_at = load_state(run_dir / "checkpoints" / "last.pt")["step"]
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert 0 < killed_at < 12 and not (run_dir / "result.json").exists()

    out = _run(cmd, env, tmp_path, timeout=300)
    assert f"{run_dir.name} (trained); MLflow run {run_id}" in out, out
    # The progress bar of the rerun starts at the checkpoint's step, not at 0.
    first = re.search(r"train metasegnet:\s+\d+%\|[^|]*\|\s*(\d+)/12", out)
    assert first and int(first[1]) == killed_at, out[-2000:]
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id
    assert json.loads((run_dir / "result.json").read_text())["run_id"] == run_id

    cfg = from_dict(_train_config(tiny_store, tmp_path / "straight"))
    straight = train(cfg, tmp_path / "straight", progress=False)
    assert straight.steps == 12
    a = load_state(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_state(run_dir / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test/miou" in run.data.metrics
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # The loss curve of the continued run covers every step, each once.
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, 13)), f"train/loss logged at steps {steps}"


# --------------------------------------------------------- (e) `fss ablate`, killed and rerun

@pytest.mark.timeout(600)
def test_killed_ablation_trains_only_the_missing_points(tiny_store: str, tmp_path: Path,
                                                        prefect_api_url: str) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _env(PREFECT_API_URL=prefect_api_url, MLFLOW_TRACKING_URI=uri)
    runs = tmp_path / "runs"
    base = _train_config(tiny_store, runs, steps=6, val_every=6, checkpoint_every=3)
    study = {"study": "faults", "experiment": "faults-ablation",
             "base": {k: v for k, v in base.items() if k not in ("model", "experiment")},
             "grid": {"model": ["metasegnet"], "budget": [0.25, 0.5, 1.0], "seed": [0]}}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    cmd = [*FSS, "ablate", "--config", str(config), "--workers", "1",
           "--out", str(tmp_path / "reports")]

    def results() -> list[Path]:
        return sorted(runs.glob("*/result.json"))

    survivors = _kill_when(cmd, tmp_path / "killed.log", env, tmp_path,
                           "the first point's result.json", lambda: bool(results()), 420)
    done = len(results())
    assert 1 <= done < 3, f"{done} of 3 points finished before the kill"
    assert not survivors, "processes of the killed run outlived it:\n" + "\n".join(survivors)

    out = _run(cmd, env, tmp_path, timeout=420)
    assert f"ablation faults: 3 points, {3 - done} trained, {done} already done, 0 failed" in out
    assert len(results()) == 3


@pytest.mark.timeout(600)
def test_pseudo_and_ablation_on_an_external_cluster_match_a_local_cluster(
        tiny_store: str, tmp_path: Path, prefect_api_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same flows, unchanged, on a LocalCluster and on a real scheduler + workers."""
    import shutil

    from flows.ablate import run_ablation
    from flows.pseudo import run_pseudo
    from flows.runtime import prefect_api

    embedder = _seeded_embedder(tmp_path / "embedder.pth")
    (tmp_path / "logs").mkdir()
    stores = {}
    for where in ("local", "external"):
        stores[where] = str(tmp_path / f"{where}.zarr")
        shutil.copytree(tiny_store, stores[where])

    def study(where: str) -> dict[str, Any]:
        return {"study": "ext", "experiment": f"ext-{where}",
                "base": {"store": stores[where], "dataset": "synth", "steps": 2,
                         "batch_size": 2, "checkpoint_every": 2, "val_every": 2,
                         "val_episodes": 2, "test_episodes": 6, "test_shots": [1],
                         "min_pixels": 64, "out_dir": str(tmp_path / where / "runs"),
                         "model_args": {"embed_dim": 16, "global_dim": 32, "local_dim": 16}},
                "grid": {"model": ["metasegnet"], "budget": [1.0]}}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    common = dict(name="synth", k=4, sample_size=2000, report=False, progress=False)
    with prefect_api():
        pseudo_local = run_pseudo(workers=1, embedder=embedder, store_url=stores["local"],
                                  **common)
        ablation_local = run_ablation(study("local"), workers=1, progress=False,
                                      out_dir=str(tmp_path / "local" / "reports"))
        with dask_cluster(2, tmp_path / "logs", _env()) as (address, _):
            pseudo_ext = run_pseudo(dask_address=address, embedder=embedder,
                                    store_url=stores["external"], **common)
            ablation_ext = run_ablation(study("external"), dask_address=address,
                                        progress=False,
                                        out_dir=str(tmp_path / "external" / "reports"))

    assert pseudo_local["key"] == pseudo_ext["key"] and pseudo_ext["complete"]
    version = store.resolve_version(stores["local"], "synth")
    derived = Path("derived") / pseudo_local["key"]
    assert _checksums(_version_dir(stores["external"], version) / derived) == _checksums(
        _version_dir(stores["local"], version) / derived)
    assert ablation_local["failed"] == ablation_ext["failed"] == []
    assert ablation_ext["trained"] == 1
    row = [line for line in ablation_local["table"].splitlines() if "| metasegnet |" in line]
    assert row and row == [line for line in ablation_ext["table"].splitlines()
                           if "| metasegnet |" in line]  # same CPU training, same metrics
