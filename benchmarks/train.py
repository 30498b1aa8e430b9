"""Training throughput per model, and cached frozen features vs the backbone in the loop.

    .venv/bin/python benchmarks/train.py [--store data/store.zarr --dataset synth] [--steps 6]

Each variant runs `--repeats` times, interleaved, after one warm-up step; the median is reported
and the ratios are taken within this run (the machines here are noisy). On a CUDA machine the
same runs happen on the GPU (`--device auto`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tasks.data.store import open_dataset
from tasks.fewshot.config import TrainConfig
from tasks.fewshot.episodes import episodes_for_step
from tasks.fewshot.training import (
    build_model,
    feature_cache,
    labelled_data,
    make_batch,
    pick_device,
)

VARIANTS = {
    "metasegnet 1-way": dict(model="metasegnet"),
    "metasegnet 2-way": dict(model="metasegnet", ways=2),
    "panet": dict(model="panet"),
    "umt (trainable backbone)": dict(model="umt", model_args={"freeze_backbone": False}),
    "umt (frozen, backbone in loop)": dict(model="umt"),
    "umt (frozen, cached features)": dict(model="umt", cache_features=True),
}


def steps_per_second(cfg: TrainConfig, steps: int) -> float:
    device = pick_device(cfg.device)
    ds = open_dataset(cfg.store, cfg.dataset)
    sampler = labelled_data(cfg, ds).train
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device).train()
    cache = feature_cache(cfg, model, ds, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if cache is not None:  # the cache is filled once per run, like the features flow would
        for step in range(steps + 1):
            cache.batch(episodes_for_step(sampler, step, cfg.batch_size))
    timings = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        batch = make_batch(episodes_for_step(sampler, step, cfg.batch_size), device, cache)
        loss = model.compute_objective(batch, cfg.ways)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(timings[1:])  # step 0 warms up kernels and caches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="data/store.zarr")
    p.add_argument("--dataset", default="synth")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores; batch {args.batch_size} episodes, 1-shot, "
          f"{args.steps} timed steps x {args.repeats} repeats (median)")
    base = dict(store=args.store, dataset=args.dataset, batch_size=args.batch_size,
                min_pixels=200, device=args.device)
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, kw in VARIANTS.items():
            runs[name].append(steps_per_second(TrainConfig(**(base | kw)), args.steps))
    rate = {name: statistics.median(v) * args.batch_size for name, v in runs.items()}
    print(f"\n{'variant':<34}{'episodes/s':>12}")
    for name, eps in rate.items():
        print(f"{name:<34}{eps:>12.1f}")
    ratio = rate["umt (frozen, cached features)"] / rate["umt (frozen, backbone in loop)"]
    print(f"\ncached features vs backbone in the loop (UMT, frozen backbone): {ratio:.2f}x")


if __name__ == "__main__":
    main()
