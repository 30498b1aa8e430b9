"""Prefetching episode loader: the batches of steps s+1..s+k are read while step s trains.

A training step's episodes depend only on its sampler's seed and the step
(`episodes_for_step`), so they can be prepared ahead, in any process, and arrive in the same
order with the same tensors: prefetching changes when a batch is read, never what is read.
The loader reads exactly the episodes of the steps it is given (never past the phase's last
step), through the same samplers, so a point's label budget is untouched.

Three ways to run, by `workers` (`TrainConfig.loader_workers`):

- ``0``: in this process, when the step asks for it (no overlap; what training always did);
- ``n > 0``: a `torch.utils.data.DataLoader` with ``n`` worker processes (forked, so the
  samplers and their open store handles are inherited, not pickled; zarr resets its I/O loop
  in a forked child), ``prefetch_factor`` batches ahead each, pinned memory on CUDA;
- ``n > 0`` in a daemonic process (a Dask worker of `fss ablate`, which may not have
  children): ``n`` threads instead, as many batches ahead. Zarr's decompression and torch's
  conversions release the GIL, so threads overlap too (benchmarks/loader.py measures both).

A generator the DataLoader draws its worker seeds from is passed explicitly: otherwise it
would draw them from torch's global RNG, which training checkpoints and resumes from.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from tasks.fewshot.episodes import Episode, EpisodeSampler, batch_to_tensors, episodes_for_step
from tasks.labelfree.pseudo_tasks import PseudoEpisodeSampler

Sampler = EpisodeSampler | PseudoEpisodeSampler
# Loader workers where the config leaves them to the device (`loader_workers: null`). CPU: none,
# the step's own threads already use every core and prefetching did not pay on 2 cores
# (benchmarks/loader.py, README). CUDA: the CPU is free while the GPU computes, and one process
# prepares 8 episodes at 473 px in ~0.3 s, far longer than a GPU step; four keep up (fewer
# where fewer cores are free: one stays with the training loop).
CPU_WORKERS = 0
CUDA_WORKERS = 4
# Batches each worker keeps ready (DataLoader's prefetch_factor; per thread for threads): two
# hide a read that is up to twice as slow as a step, and cost two batches of memory each.
PREFETCH_PER_WORKER = 2


@dataclass(frozen=True)
class EpisodeIds:
    """What identifies an episode's images, without them (what the feature cache needs)."""

    classes: list[int]
    support_ids: list[str]
    query_id: str


@dataclass
class StepBatch:
    """The model inputs of one training step on the CPU (`batch_to_tensors`), and its episodes'
    ids (the frozen-feature cache looks features up by them)."""

    step: int
    tensors: dict[str, torch.Tensor]
    episodes: list[EpisodeIds]

    @classmethod
    def of(cls, step: int, episodes: Sequence[Episode]) -> StepBatch:
        return cls(step, batch_to_tensors(episodes),
                   [EpisodeIds(e.classes, e.support_ids, e.query_id) for e in episodes])

    def pin_memory(self) -> StepBatch:
        """Page-locked copies (the DataLoader calls this on CUDA): host-to-GPU copies of them
        run asynchronously (`.to(device, non_blocking=True)`)."""
        return StepBatch(self.step, {k: v.pin_memory() for k, v in self.tensors.items()},
                         self.episodes)


class StepBatches(TorchDataset):
    """Map-style dataset whose item ``s`` is the batch of training step ``s``."""

    def __init__(self, stream: Callable[[int], Sampler], batch_size: int):
        self.stream, self.batch_size = stream, batch_size

    def __getitem__(self, step: int) -> StepBatch:
        step = int(step)
        return StepBatch.of(step, episodes_for_step(self.stream(step), step, self.batch_size))


def workers_for(configured: int | None, device: torch.device) -> int:
    """The loader workers of a run: the configured number, or the device's default."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return CPU_WORKERS
    return min(CUDA_WORKERS, max(1, len(os.sched_getaffinity(0)) - 1))


def step_batches(stream: Callable[[int], Sampler], batch_size: int, steps: range, *,
                 workers: int = 0, pin_memory: bool = False,
                 threads: bool | None = None) -> Iterator[StepBatch]:
    """The batches of `steps`, in order; `stream(step)` is the sampler a step draws from.

    `threads` picks the kind of worker: None (default) processes, or threads where this
    process may not have children.

    Close the iterator (`.close()`) when the loop ends early, to stop its workers at once
    (otherwise they stop when it is garbage-collected).
    """
    if workers < 0:
        raise ValueError(f"loader workers must be >= 0, got {workers}")
    dataset = StepBatches(stream, batch_size)
    if workers == 0 or len(steps) == 0:
        return (dataset[s] for s in steps)
    if threads is None:
        threads = multiprocessing.current_process().daemon
    if threads:
        return _threaded(dataset, steps, workers)
    return _processes(dataset, steps, workers, pin_memory)


def _processes(dataset: StepBatches, steps: range, workers: int,
               pin_memory: bool) -> Iterator[StepBatch]:
    loader = DataLoader(
        dataset, batch_size=None, sampler=steps, num_workers=min(workers, len(steps)),
        prefetch_factor=PREFETCH_PER_WORKER, pin_memory=pin_memory,
        multiprocessing_context="fork", generator=torch.Generator())
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        iterator._shutdown_workers()  # noqa: SLF001 - the documented way is to drop it; be prompt


def _threaded(dataset: StepBatches, steps: range, workers: int) -> Iterator[StepBatch]:
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="episode-loader")
    pending: deque[Future[StepBatch]] = deque()
    upcoming = iter(steps)
    try:
        for step in upcoming:
            pending.append(pool.submit(dataset.__getitem__, step))
            if len(pending) >= workers * PREFETCH_PER_WORKER:
                break
        while pending:
            batch = pending.popleft().result()
            step = next(upcoming, None)
            if step is not None:
                pending.append(pool.submit(dataset.__getitem__, step))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
