"""The shard fan-out helpers: how shards are grouped into tasks, and what the tasks are called."""

from __future__ import annotations

import pytest

from flows.fanout import (
    MAX_TASKS_IN_FLIGHT,
    TASKS_PER_SLOT,
    artifact_slug,
    group_units,
    shard_groups,
    shard_label,
    shard_run_name,
)


@pytest.mark.parametrize("n_units,n_groups", [(16, 4), (79, 4), (7, 4), (3, 8), (1, 1), (10, 3)])
def test_groups_are_contiguous_ordered_and_even(n_units: int, n_groups: int) -> None:
    units = [2 * k + 1 for k in range(n_units)]  # not 0..n-1: groups hold units, not indices
    groups = group_units(units, n_groups)
    assert [u for g in groups for u in g] == units
    assert len(groups) == min(n_units, n_groups)
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_no_units_no_groups() -> None:
    assert group_units([], 4) == []


def test_task_names_say_which_shards() -> None:
    assert shard_label([5]) == "shard 5"
    assert shard_label([3, 4, 5, 6]) == "shards 3-6"
    assert shard_label([3, 5, 8]) == "shards 3, 5, 8"  # a resumed run skips the done shards
    name = shard_run_name("pseudo masks")
    assert name(parameters={"name": "synth", "shards": [0, 1, 2], "client": None}) == (
        "pseudo masks synth shards 0-2")


class Cluster:
    def __init__(self, *threads: int) -> None:
        self.threads = threads

    def nthreads(self) -> dict[str, int]:
        return {f"tcp://127.0.0.1:{i}": n for i, n in enumerate(self.threads)}


def test_shard_runs_follow_the_cluster_size() -> None:
    shards = list(range(3, 103))
    runs = shard_groups(Cluster(1, 1), shards)  # two worker threads
    assert len(runs) == 2 * TASKS_PER_SLOT and [s for r in runs for s in r] == shards
    assert len(shard_groups(Cluster(*[4] * 50), shards)) == MAX_TASKS_IN_FLIGHT
    assert shard_groups(Cluster(2), [7]) == [[7]]
    assert shard_groups(None, []) == []  # nothing to do needs no cluster


def test_artifact_keys_stay_what_they_were() -> None:
    # Every character other than a letter or digit becomes one dash (progress artifacts made
    # before the shared helper keep their keys, and so their history).
    assert artifact_slug("Synth_v2.big") == "synth-v2-big"
    assert artifact_slug("a..b") == "a--b"
