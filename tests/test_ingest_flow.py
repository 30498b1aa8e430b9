"""The ingest flow for real: a Prefect server on 127.0.0.1 and a 2-worker Dask LocalCluster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from flows.ingest import run_ingest
from flows.runtime import prefect_api
from tasks.data import store
from tasks.data.readers import make_reader

pytestmark = pytest.mark.slow


def test_flow_on_local_cluster_then_rerun_is_noop(
        synth_root: Path, tmp_path: Path, prefect_api_url: str, capsys) -> None:
    url = str(tmp_path / "store.zarr")
    params = dict(source="coco", root=str(synth_root / "coco"), store_url=url, name="synth",
                  splits=["train", "val"], size=64, shard_size=16, progress=False)
    with prefect_api() as api:
        assert api == prefect_api_url
        first = run_ingest(workers=2, **params)
        second = run_ingest(workers=2, **params)
    assert first["complete"] and first["shards_written"] == first["shards"] == 4
    assert first["ingested"] + first["quarantined"] == first["listed"] == 56
    assert second["shards_written"] == 0 and second["shards_skipped"] == 4
    assert second["version"] == first["version"]
    # The Prefect UI names the runs by what they do.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}), \
            get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["ingest synth"])))
            if r.parameters.get("store_url") == url]  # other tests ingest "synth" too
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id={"any_": [r.id for r in runs]}))
    assert len(runs) == 2  # the rerun submits no shard task: all were done
    assert sorted(t.name for t in tasks) == [f"ingest synth shard {k}" for k in range(4)]

    ds = store.open_dataset(url, "synth")
    reader = make_reader("coco", synth_root / "coco", "val")
    item = reader.list_items()[3]
    _, label = reader.load(item)
    # The synthetic COCO export numbers each split from 1: ids are namespaced by split.
    assert ds.split_ids("val")[3] == f"val/{item.id}"
    np.testing.assert_array_equal(ds.original_mask(f"val/{item.id}"), label)

    assert main(["store", "inspect", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["datasets"]["synth"][first["version"]]
    assert info["ingested"] == 56 and info["splits"] == {"train": 40, "val": 16}


def test_cli_reports_counts_and_wrong_root(
        synth_root: Path, tmp_path: Path, prefect_api_url: str, capsys) -> None:
    url = str(tmp_path / "store.zarr")
    code = main(["ingest", "--source", "voc", "--root", str(synth_root / "voc"),
                 "--split", "val", "--store", url, "--name", "v", "--size", "48",
                 "--shard-size", "4", "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "ingested 16 + quarantined 0 = 16 of 16 listed" in out
    # 4 shards on 1 worker thread: two Prefect tasks (TASKS_PER_SLOT), each a run of shards.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}), \
            get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["ingest v"])))
            if r.parameters.get("store_url") == url]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id={"any_": [r.id for r in runs]}))
    assert sorted(t.name for t in tasks) == ["ingest v shards 0-1", "ingest v shards 2-3"]
    code = main(["ingest", "--source", "voc", "--root", str(tmp_path / "missing"),
                 "--store", url, "--name", "v"])
    assert code == 2
    assert "missing" in capsys.readouterr().err
