"""`fss demo`: the end-to-end run on the embedded default (synthetic data, LocalCluster)."""

from __future__ import annotations

import time
from pathlib import Path

from flows.cli import print_ingest_summary


def run_demo(workdir: Path, *, quick: bool = False, workers: int = 2) -> int:
    """Synthesise the benchmark, ingest it over Dask into Zarr, and inspect the store."""
    from flows.ingest import run_ingest
    from flows.runtime import prefect_api
    from tasks.store import inspect_store
    from tasks.synth import synthesize

    workdir.mkdir(parents=True, exist_ok=True)
    n_train, n_val = (96, 32) if quick else (600, 200)
    data, store_url = workdir / "synth", str(workdir / "store.zarr")
    t0 = time.perf_counter()
    print(f"[1/3] synthetic benchmark: {n_train} train + {n_val} val images -> {data}")
    synthesize(data, n_train=n_train, n_val=n_val, seed=0, progress=True)
    print(f"[2/3] ingest (VOC layout) over a {workers}-worker Dask LocalCluster -> {store_url}")
    with prefect_api() as api:
        print(f"      Prefect API: {api}")
        t1 = time.perf_counter()
        summary = run_ingest(workers=workers, source="voc", root=str((data / "voc").resolve()),
                             store_url=store_url, name="synth", splits=["train", "val"])
    print_ingest_summary(summary, time.perf_counter() - t1)
    print("[3/3] store contents")
    for name, versions in inspect_store(store_url)["datasets"].items():
        for version, v in versions.items():
            print(f"      {name}/{version}: {v['ingested']} images, splits {v['splits']}, "
                  f"{len(v['classes']) - 1} classes, {sum(v['bytes'].values()) / 2**20:.1f} MiB")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s. Next: fss store inspect "
          f"{store_url}")
    print("Training, evaluation and the label-budget ablation are not part of the demo yet.")
    return 0 if summary["complete"] else 1
