"""Dask workers' malloc settings and what `tasks.malloc` does about them, in fresh processes
(malloc reads its environment once, at start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# 2,000 image-sized buffers (64 rows of 144 px RGB: 4 MB, and 256 KB ones) allocated, touched
# and freed in turn, as an ingest worker does per shard and per image; prints the page faults.
CHURN = """
import json, resource, sys
import numpy as np
from tasks.malloc import keep_large_buffers_on_heap
tuned = keep_large_buffers_on_heap() if sys.argv[1] == "tune" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for k in range(2000):
    a = np.ones(256 * 1024 if k % 50 else 64 * 144 * 144 * 3, np.uint8)
    del a
print(json.dumps({"tuned": tuned,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def churn(tune: bool, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", CHURN, "tune" if tune else "plain"], env=environ,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_a_dask_worker_environment_faults_in_every_buffer_until_tuned():
    dask_env = {"MALLOC_TRIM_THRESHOLD_": "65536"}  # distributed.nanny.pre-spawn-environ
    plain, worker = churn(False), churn(False, **dask_env)
    tuned = churn(True, **dask_env)
    assert tuned["tuned"] and not plain["tuned"]
    assert worker["faults"] > 20 * max(plain["faults"], 100)  # the cost this module removes
    assert tuned["faults"] < worker["faults"] / 20


def test_tuning_leaves_other_processes_and_explicit_choices_alone():
    assert not churn(True)["tuned"]  # glibc's dynamic thresholds are in effect: nothing to do
    assert not churn(True, MALLOC_TRIM_THRESHOLD_="65536", MALLOC_MMAP_THRESHOLD_="131072")[
        "tuned"]  # the user chose the threshold


# Inside `large_buffers_on_heap`, 1 MiB buffers live on the heap; half of them freed leave
# holes that the heap keeps; leaving the block hands them back (malloc_trim). Prints RSS, MiB.
HOLES = """
import json, os
import numpy as np
from tasks.malloc import large_buffers_on_heap
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
with large_buffers_on_heap():
    kept = [np.ones(2**20, np.uint8) for _ in range(300)]
    del kept[::2]  # every other buffer freed: holes below the ones still alive
    inside = rss()
after = rss()
print(json.dumps({"inside": inside, "after": after}))
"""


def test_leaving_the_block_hands_the_heap_s_free_memory_back():
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True,
                         check=True, env=environ | {"MALLOC_TRIM_THRESHOLD_": "65536"}).stdout
    rss = json.loads(out)
    assert rss["inside"] - rss["after"] > 100  # ~150 MiB of holes returned
