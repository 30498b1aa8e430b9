"""One fan-out loop for the shard flows (ingest, features, pseudo): submit one Prefect task per
unit of work, follow them with a tqdm bar and a Prefect progress artifact, collect the results as
they complete. The units are contiguous runs of shards (`shard_groups`), each handed to Dask as
one plain call by a Prefect task in the flow's process."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from tqdm.auto import tqdm

Unit = TypeVar("Unit")
Result = TypeVar("Result")

# Prefect tasks per Dask worker thread when shards are grouped into tasks: one would leave a
# fast worker idle while a slow one finishes; more adds Prefect's per-task cost (state API
# calls, events, logs: ~0.2 s of CPU a task here) for nothing.
TASKS_PER_SLOT = 2
# Prefect tasks that wait on Dask work at once in the flow's thread pool (a cap on the groups).
MAX_TASKS_IN_FLIGHT = 64


def artifact_slug(name: str) -> str:
    """``name`` as a Prefect artifact key part: lowercase letters, digits and dashes only (every
    other character becomes a dash, so keys made before this helper stay what they were)."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def fan_out(submit: Callable[[Unit], PrefectFuture[Result]], units: Sequence[Unit], *,
            total: int, done: int, artifact_key: str, description: str, label: str,
            progress: bool = True, weight: Callable[[Unit], int] | None = None) -> list[Result]:
    """Submit ``submit(unit)`` for every unit, then wait for them all; results in completion
    order. The bar (``label``, unit "shard") and the progress artifact (``artifact_key``) count
    ``total`` shards, ``done`` of them finished before; a unit stands for ``weight(unit)`` shards
    (default 1)."""
    futures = [submit(u) for u in units]
    weight_of = {id(f): (weight(u) if weight else 1) for f, u in zip(futures, units, strict=True)}
    artifact = create_progress_artifact(progress=100.0 * done / total, key=artifact_key,
                                        description=description)
    bar = tqdm(total=total, initial=done, unit="shard", disable=not progress, desc=label)
    results = []
    for future in as_completed(futures):
        results.append(future.result())
        bar.update(weight_of[id(future)])
        update_progress_artifact(artifact, progress=100.0 * bar.n / total)
    bar.close()
    return results


def dask_slots(client: Any) -> int:
    """Task slots (threads) of the Dask cluster behind ``client``; 1 before any worker joined."""
    return max(1, sum(client.nthreads().values()))


def group_units(units: Sequence[Unit], n_groups: int) -> list[list[Unit]]:
    """``units`` in ``n_groups`` (at most one per unit) contiguous groups whose sizes differ by
    at most one, in order."""
    n_groups = max(1, min(n_groups, len(units)))
    size, extra = divmod(len(units), n_groups)
    groups, start = [], 0
    for g in range(n_groups):
        stop = start + size + (g < extra)
        groups.append(list(units[start:stop]))
        start = stop
    return [g for g in groups if g]


def shard_groups(client: Any, shards: Sequence[int]) -> list[list[int]]:
    """``shards`` in contiguous runs, one Prefect task each: `TASKS_PER_SLOT` per thread of the
    cluster behind ``client``, at most `MAX_TASKS_IN_FLIGHT` (one shard a run when there are
    fewer shards). No shards, no runs: ``client`` is then not used (and may be None)."""
    if not shards:
        return []
    return group_units(shards, min(MAX_TASKS_IN_FLIGHT, dask_slots(client) * TASKS_PER_SLOT))


def shard_run_name(prefix: str) -> Callable[..., str]:
    """A Prefect ``task_run_name`` for a task with ``name`` and ``shards`` parameters:
    ``<prefix> <name> shards 0-3`` (`shard_label`)."""
    def run_name(parameters: dict[str, Any]) -> str:  # Prefect passes a task's parameters
        return f"{prefix} {parameters['name']} {shard_label(parameters['shards'])}"

    return run_name


def shard_label(shards: Sequence[int]) -> str:
    """``shard 3``, ``shards 3-7`` (contiguous) or ``shards 3, 5, 8`` for a task's run name."""
    if len(shards) == 1:
        return f"shard {shards[0]}"
    if list(shards) == list(range(shards[0], shards[0] + len(shards))):
        return f"shards {shards[0]}-{shards[-1]}"
    return "shards " + ", ".join(map(str, shards))

