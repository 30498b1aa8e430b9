"""Does training wait on data? Training steps/s with and without the prefetching loader, and
the episodes/s the loader delivers.

    .venv/bin/python benchmarks/loader.py [--steps 20] [--repeats 3] [--parts ab]

(a) training throughput: the training loop's own parts (`step_batches`, `make_batch`,
    the model's `compute_objective`, AdamW) over the same steps with the batches read when the
    step asks (`loader_workers: 0`, today's loop) and by 1 and 2 loader threads, interleaved,
    `--repeats` times; each figure is the median. The clock starts after one warm-up step:
    starting the threads (once per training phase) is not counted.
(b) loader supply at 473 px (the PASCAL-5i protocol size): batches of `--batch-size` 1-way
    1-shot episodes with no training, from a fresh `Dataset` (cold shard cache: every shard
    is read and decoded once) and again (warm), when asked and by 1 and 2 loader
    threads: episodes/s, and the training step time that supply could feed.

The synthetic stores (`tasks.data.synth` + the in-process ingest, as `fss data synth` and
`fss ingest` make them) are generated once under `--workdir` (default `benchmarks/.work/`).
The machine may be shared: read the ratios within one run, and the load average printed at
the start and the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tables import table  # a sibling module: the benchmarks run as scripts

from tasks.data import ingest
from tasks.data.store import Dataset, open_dataset
from tasks.data.synth import synthesize
from tasks.fewshot.config import TrainConfig
from tasks.fewshot.loader import step_batches
from tasks.fewshot.training import (
    build_model,
    feature_cache,
    labelled_data,
    make_batch,
    pick_device,
)

NAME = "synth"
CORES = len(os.sched_getaffinity(0))
# (label, loader threads): how the batches are read
LOADERS = [("when the step asks (0)", 0), ("1 thread", 1), ("2 threads", 2)]
MODELS = {
    "metasegnet (small)": dict(model="metasegnet",
                               model_args={"embed_dim": 16, "global_dim": 32, "local_dim": 16}),
    "umt (frozen, cached features)": dict(
        model="umt", cache_features=True,
        model_args={"dim": 64, "n_fg_protos": 5, "n_bg_protos": 10, "heads": 4,
                    "kmeans_iters": 3, "freeze_backbone": True}),
}


def synthetic_store(workdir: Path, images: int, size: int) -> str:
    """A store of the synthetic benchmark at `size` px (80 % train), made once and reused."""
    root = workdir / f"synth-{images}-{size}"
    url = str(workdir / f"store-{images}-{size}.zarr")
    synthesize(root, n_train=images - images // 5, n_val=images // 5, size=size, seed=0)
    ingest.ingest_dataset("voc", str(root / "voc"), url, NAME, splits=["train", "val"],
                          size=size)
    return url


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def training_seconds(cfg: TrainConfig, ds: Dataset, steps: int, workers: int) -> float:
    """Seconds for `steps` training steps after one warm-up step (the loader's start)."""
    device = pick_device(cfg.device)
    sampler = labelled_data(cfg, ds).train
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device).train()
    cache = feature_cache(cfg, model, ds, device)
    if cache is not None:  # filled once, as a phase of cached-feature training does early on
        for batch in step_batches(lambda s: sampler, cfg.batch_size, range(steps + 1)):
            cache.batch(batch.episodes)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch: object) -> None:
        loss = model.compute_objective(make_batch(batch, device, cache), cfg.ways)
        opt.zero_grad()
        loss.backward()
        opt.step()

    batches = step_batches(lambda s: sampler, cfg.batch_size, range(steps + 1), workers=workers,
                           pin_memory=device.type == "cuda")
    step(next(batches))  # kernels, allocator and the shard cache warm up
    t0 = time.perf_counter()
    for batch in batches:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def part_a(args: argparse.Namespace, url: str) -> None:
    ds = open_dataset(url, NAME)
    base = dict(store=url, dataset=NAME, batch_size=args.batch_size, min_pixels=200,
                device=args.device, seed=0)
    runs: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for model, kw in MODELS.items():
            cfg = TrainConfig(**(base | kw))
            for label, workers in LOADERS:
                seconds = training_seconds(cfg, ds, args.steps, workers)
                runs.setdefault((model, label), []).append(args.steps / seconds)
    rows = []
    for model in MODELS:
        ref = statistics.median(runs[(model, LOADERS[0][0])])
        for label, *_ in LOADERS:
            rate = statistics.median(runs[(model, label)])
            rows.append([model, label, rate, rate * args.batch_size, f"{rate / ref:.2f}x"])
    table(f"(a) training steps/s, {ds.size} px, batch {args.batch_size}, {args.steps} steps "
          f"x {args.repeats} (median)",
          ["model", "loader", "steps/s", "episodes/s", "vs when asked"], rows)


def supply(url: str, batch_size: int, steps: int, workers: int,
           warm: Dataset | None) -> tuple[float, float]:
    """(first-batch seconds, episodes/s after it) of a loader with nothing else to do."""
    ds = warm if warm is not None else open_dataset(url, NAME)
    sampler = labelled_data(TrainConfig(store=url, dataset=NAME, min_pixels=200), ds).train
    t0 = time.perf_counter()
    batches = step_batches(lambda s: sampler, batch_size, range(steps + 1), workers=workers)
    next(batches)
    t1 = time.perf_counter()
    for _ in batches:
        pass
    return t1 - t0, steps * batch_size / (time.perf_counter() - t1)


def part_b(args: argparse.Namespace, url: str) -> None:
    warm = open_dataset(url, NAME)
    supply(url, args.batch_size, args.supply_steps, 0, warm)  # fill its shard cache
    cases: dict[str, Callable[[], tuple[float, float]]] = {}
    for workers in (0, 1, 2):
        label = "when asked" if workers == 0 else f"{workers} thread{'s' * (workers > 1)}"
        cases[f"{label}, cold cache"] = (
            lambda w=workers: supply(url, args.batch_size, args.supply_steps, w, None))
        cases[f"{label}, warm cache"] = (
            lambda w=workers: supply(url, args.batch_size, args.supply_steps, w, warm))
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            runs[name].append(fn())
    rows = []
    for name, results in runs.items():
        first = statistics.median(r[0] for r in results)
        rate = statistics.median(r[1] for r in results)
        rows.append([name, first, rate, 1000 * args.batch_size / rate])
    size = warm.size
    table(f"(b) loader supply, {size} px, batch {args.batch_size} 1-way 1-shot episodes, "
          f"{args.supply_steps} batches x {args.repeats} (median), no training",
          ["loader", "s to 1st batch", "episodes/s", f"feeds a step of >= ms (batch "
           f"{args.batch_size})"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("benchmarks/.work/loader"))
    p.add_argument("--images", type=int, default=300, help="images per synthetic store")
    p.add_argument("--train-size", type=int, default=144, help="px of the store of part (a)")
    p.add_argument("--supply-size", type=int, default=473, help="px of the store of part (b)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per run")
    p.add_argument("--supply-steps", type=int, default=30, help="batches per supply run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--parts", default="ab")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir.parent / ".gitignore").write_text("*\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {pick_device(args.device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, {CORES} cores; {load()}")
    if "a" in args.parts:
        part_a(args, synthetic_store(args.workdir, args.images, args.train_size))
    if "b" in args.parts:
        part_b(args, synthetic_store(args.workdir, args.images, args.supply_size))
    print(f"\n{load()}")


if __name__ == "__main__":
    main()
