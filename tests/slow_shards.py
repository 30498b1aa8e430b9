"""A Dask worker preload for the fault tests: every shard of ingest and features takes
`DELAY` s more, so a test can kill a worker (or a whole run) while shards are still in flight.

The shard runs of a flow take well under a second on this data; without the delay, whether a
killer thread sees a busy worker between "the first shard is done" and "all are done" is a
race. Only the timing changes: the shards' work and results are the product's own.

Loaded with ``DASK_DISTRIBUTED__WORKER__PRELOAD="['<this file>']"`` (`SLOW_WORKERS` in
test_faults.py), which both `dask worker` and the CLI's local cluster read.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from tasks.data import ingest
from tasks.labelfree import features

DELAY = 0.25  # s per shard: 14 shards keep 2 workers busy for ~2 s more


def _slowed(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(DELAY)
        return fn(*args, **kwargs)

    return slow


# The shard-run functions (`ingest_shards`, `extract_shards`) call these by module name.
ingest.ingest_shard = _slowed(ingest.ingest_shard)
features.extract_shard = _slowed(features.extract_shard)
