"""Prefetching episode loader: the batches of steps s+1..s+k are read while step s trains.

A training step's episodes depend only on its sampler's seed and the step
(`episodes_for_step`), so they can be prepared ahead, in any process, and arrive in the same
order with the same tensors: prefetching changes when a batch is read, never what is read.
The loader reads exactly the episodes of the steps it is given (never past the phase's last
step), through the same samplers, so a point's label budget is untouched.

By `workers` (`TrainConfig.loader_workers`):

- ``0``: in this process, when the step asks for it (no overlap; what training always did);
- ``n > 0``: ``n`` background threads, ``PREFETCH_PER_WORKER`` batches ahead each, pinned
  memory on CUDA. Reads (`os.pread`), zstd decoding and torch's conversions release the GIL,
  and on a GPU the training thread mostly waits on the device, so threads overlap the reads
  with the step. Threads rather than forked DataLoader workers: a training process has threads
  of its own (Prefect's API logging, MLflow, zarr's I/O loop), and forking it left workers that
  hung or died at exit in the full test suite; threads share the samplers as they are.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tasks.fewshot.episodes import Episode, EpisodeSampler, batch_to_tensors, episodes_for_step
from tasks.labelfree.pseudo_tasks import PseudoEpisodeSampler

Sampler = EpisodeSampler | PseudoEpisodeSampler
# Loader workers where the config leaves them to the device (`loader_workers: null`). CPU: none,
# the step's own threads already use every core and prefetching did not pay on 2 cores
# (benchmarks/loader.py, README). CUDA: the CPU is free while the GPU computes, and one reader
# prepares 8 episodes at 473 px in ~0.1 s, longer than a GPU step; four keep up (fewer where
# fewer cores are free: one stays with the training loop).
CPU_WORKERS = 0
CUDA_WORKERS = 4
# Batches each worker thread keeps ready: two hide a read that is up to twice as slow as a step,
# and cost two batches of memory each.
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
        """Page-locked copies (the loader makes them on CUDA): host-to-GPU copies of them run
        asynchronously (`.to(device, non_blocking=True)`)."""
        return StepBatch(self.step, {k: v.pin_memory() for k, v in self.tensors.items()},
                         self.episodes)


class StepBatches:
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
                 workers: int = 0, pin_memory: bool = False) -> Iterator[StepBatch]:
    """The batches of `steps`, in order; `stream(step)` is the sampler a step draws from.

    Close the iterator (`.close()`) when the loop ends early, to stop its threads at once
    (otherwise they stop when it is garbage-collected).
    """
    if workers < 0:
        raise ValueError(f"loader workers must be >= 0, got {workers}")
    dataset = StepBatches(stream, batch_size)
    if workers == 0 or len(steps) == 0:
        return (dataset[s] for s in steps)
    return _threaded(dataset, steps, workers, pin_memory)


def _threaded(dataset: StepBatches, steps: range, workers: int,
              pin_memory: bool) -> Iterator[StepBatch]:
    def read(step: int) -> StepBatch:
        batch = dataset[step]
        return batch.pin_memory() if pin_memory else batch

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="episode-loader")
    pending: deque[Future[StepBatch]] = deque()
    upcoming = iter(steps)
    try:
        for step in upcoming:
            pending.append(pool.submit(read, step))
            if len(pending) >= workers * PREFETCH_PER_WORKER:
                break
        while pending:
            batch = pending.popleft().result()
            step = next(upcoming, None)
            if step is not None:
                pending.append(pool.submit(read, step))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
