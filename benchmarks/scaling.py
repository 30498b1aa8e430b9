"""Scaling of the ingest and features flows on real `dask scheduler` + `dask worker` processes.

    .venv/bin/python benchmarks/scaling.py [--images 500] [--repeats 3] [--mem-factor 4]

(a) throughput: both flows on 1 and 2 single-threaded workers (separate processes on
    127.0.0.1, not a LocalCluster), interleaved repeats, medians, and the 2-vs-1 ratio;
(b) peak memory: VmHWM of every worker process while each flow runs over N and mem-factor x N
    images (the bigger folder hard-links the same files under new stems).
Cluster start-up is not timed; a fresh cluster runs each measured flow, so peaks are per flow.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

# benchmarks/ is not a package: running this file puts it on sys.path, so its sibling imports.
from ingest import replicate, synth_voc
from tables import table

NAME = "bench"
EMBEDDER = {"kind": "backbone", "backbone": "small_resnet", "layer": "layer4",
            "checkpoint": None}
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mib(pid: int, field: str) -> float:
    """VmHWM (peak) or VmRSS of a process, in MiB, from /proc."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        status = Path(f"/proc/{pid}/status").read_text()
        return int(status.split(f"{field}:")[1].split()[0]) / 1024
    return float("nan")


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(15)


@contextlib.contextmanager
def cluster(n_workers: int, logs: Path, api_url: str) -> Iterator[tuple[str, list[int]]]:
    """A scheduler and `n_workers` single-threaded workers (no nanny: the pid is the worker)."""
    from distributed import Client

    env = {**os.environ, "PREFECT_API_URL": api_url, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def spawn(cmd: list[str], log: str) -> subprocess.Popen:
        with open(logs / log, "ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=ROOT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        spawn([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port",
               str(port), "--no-dashboard"], "scheduler.log")
        workers = [spawn([sys.executable, "-m", "dask", "worker", address, "--nthreads", "1",
                          "--no-nanny", "--host", "127.0.0.1", "--no-dashboard",
                          "--death-timeout", "60"], f"worker-{i}.log")
                   for i in range(n_workers)]
        with Client(address, timeout=60) as client:
            client.wait_for_workers(n_workers, timeout=120)
            # Import the flows' code (torch, prefect) now: worker start-up, not flow time.
            client.run(importlib.import_module, "flows.features")
            client.run(importlib.import_module, "flows.ingest")
        yield address, [w.pid for w in workers]
    finally:
        for proc in reversed(procs):  # workers before the scheduler
            _stop(proc)


def run_flow(stage: str, address: str, voc: Path, url: str, args: argparse.Namespace
             ) -> dict[str, Any]:
    """One flow on the cluster at `address`; the store must hold the dataset for features."""
    if stage == "ingest":
        from flows.ingest import run_ingest

        shutil.rmtree(url, ignore_errors=True)
        s = run_ingest(dask_address=address, source="voc", root=str(voc), store_url=url,
                       name=NAME, splits=["train"], size=args.size,
                       shard_size=args.shard_size, progress=False)
        assert s["complete"] and s["ingested"] == s["listed"], s
        return s
    from flows.features import run_features
    from tasks.data import store

    with contextlib.suppress(KeyError, FileNotFoundError, store.StoreError):
        version = store.resolve_version(url, NAME)
        for key in store.list_derived(url, NAME, version):  # start every run from scratch
            shutil.rmtree(Path(url) / "datasets" / NAME / version / "derived" / key,
                          ignore_errors=True)
    s = run_features(dask_address=address, store_url=url, name=NAME, embedder=EMBEDDER,
                     batch_size=args.batch_size, progress=False)
    assert s["complete"] and s["shards_skipped"] == 0, s
    return s


def measured(stage: str, workers: int, voc: Path, url: str, args: argparse.Namespace,
             api_url: str) -> dict[str, float]:
    """Seconds of one flow on a fresh cluster, and every worker's RSS before and peak after."""
    with cluster(workers, args.logs, api_url) as (address, pids):
        base = [_mib(p, "VmRSS") for p in pids]
        t0 = time.perf_counter()
        run_flow(stage, address, voc, url, args)
        seconds = time.perf_counter() - t0
        peaks = [_mib(p, "VmHWM") for p in pids]
    return {"seconds": seconds, "base": max(base), "peak": max(peaks)}


def part_throughput(args: argparse.Namespace, voc: Path, n: int, api_url: str
                    ) -> dict[str, float]:
    runs: dict[tuple[str, int], list[float]] = {(s, w): [] for s in ("ingest", "features")
                                                for w in (1, 2)}
    for rep in range(args.repeats):  # interleaved: every variant once per repeat
        for w in (1, 2):
            url = str(args.workdir / "stores" / f"scaling-{w}.zarr")
            for stage in ("ingest", "features"):
                runs[(stage, w)].append(measured(stage, w, voc, url, args, api_url)["seconds"])
        print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(
            f"{s} {w}w {n / r[-1]:.0f} img/s" for (s, w), r in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    rows: list[list[object]] = []
    ratios = {}
    for stage in ("ingest", "features"):
        one, two = n / med[(stage, 1)], n / med[(stage, 2)]
        ratios[stage] = two / one
        rows.append([stage, one, two, ratios[stage]])
    table(f"(a) throughput: {n} images at {args.size} px, shards of {args.shard_size}, "
          f"median of {args.repeats} (flow start to return; cluster start-up and imports excluded)",
          ["flow", "1 worker img/s", "2 workers img/s", "2 vs 1"], rows)
    return ratios


def part_memory(args: argparse.Namespace, voc: Path, api_url: str) -> dict[str, float]:
    rows: list[list[object]] = []
    peaks: dict[tuple[str, int], float] = {}
    sizes = []
    for times in (1, args.mem_factor):
        root = replicate(voc, args.workdir / f"voc-x{times}", times)
        n = len((root / "ImageSets" / "Segmentation" / "train.txt").read_text().split())
        sizes.append(n)
        url = str(args.workdir / "stores" / f"mem-x{times}.zarr")
        for stage in ("ingest", "features"):
            m = measured(stage, 2, root, url, args, api_url)
            peaks[(stage, times)] = m["peak"]
            rows.append([stage, n, m["seconds"], n / m["seconds"], m["base"], m["peak"],
                         m["peak"] - m["base"]])
        shutil.rmtree(url, ignore_errors=True)
    table(f"(b) peak RSS per worker (max over 2 workers), {sizes[0]} vs {sizes[1]} images",
          ["flow", "images", "seconds", "img/s", "RSS at start MiB", "peak RSS MiB",
           "peak - start MiB"], rows)
    return {s: peaks[(s, args.mem_factor)] / peaks[(s, 1)] for s in ("ingest", "features")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=500, help="synthetic images (20 %% val)")
    p.add_argument("--size", type=int, default=144, help="canonical size and synthetic size")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="features batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-factor", type=int, default=4, help="(b) compares N and N x this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="ab", help="which parts to run, e.g. 'b'")
    p.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".work")
    args = p.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / ".gitignore").write_text("*\n")
    args.logs = args.workdir / "scaling-logs"
    args.logs.mkdir(exist_ok=True)
    os.environ.setdefault("FSS_HOME", str(args.workdir / "fss"))  # Prefect server DB and log
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # inherited by the workers
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    print(f"$ {Path(sys.executable).name} benchmarks/scaling.py {' '.join(sys.argv[1:])}"
          .rstrip())
    print(f"machine: {platform.node()}, {os.cpu_count()} cores "
          f"({len(os.sched_getaffinity(0))} usable), {psutil.virtual_memory().total / 2**30:.0f}"
          f" GiB, load average {os.getloadavg()[0]:.1f}; Python {platform.python_version()}")
    from flows.runtime import prefect_api

    voc = synth_voc(args.workdir, args.images, args.size, args.seed)
    # One split of every item (hard links), as part (b) uses: the same files either way.
    flat = replicate(voc, args.workdir / "voc-x1", 1)
    n = len((flat / "ImageSets" / "Segmentation" / "train.txt").read_text().split())
    with prefect_api() as api_url:
        a = part_throughput(args, flat, n, api_url) if "a" in args.parts else None
        b = part_memory(args, voc, api_url) if "b" in args.parts else None

    print(f"\n## Summary ({n} images at {args.size} px, load average "
          f"{os.getloadavg()[0]:.1f} at the end)\n")
    print("| benchmark | measured | goal |\n| --- | --- | --- |")
    if a:
        for stage, ratio in a.items():
            print(f"| {stage} flow, 2 vs 1 dask worker processes | {ratio:.2f}x | ~2x "
                  f"(bounded by {len(os.sched_getaffinity(0))} shared cores) |")
    if b:
        for stage, ratio in b.items():
            print(f"| {stage} peak RSS per worker, {args.mem_factor}x the images | "
                  f"{ratio:.2f}x | ~1.0x (flat) |")


if __name__ == "__main__":
    main()
