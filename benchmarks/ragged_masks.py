"""Peak memory of one large image among small ones: padded vs ragged original-size masks.

    .venv/bin/python benchmarks/ragged_masks.py [--big 4000] [--small 144] [--n 64]
        [--tree OLD_CHECKOUT ...]

Issue 12's case scaled down: a VOC split of ``--n - 1`` images of ``--small`` px and one of
``--big`` x ``--big`` px, ingested with shards of ``--n`` rows (all in one shard, as in the
issue). For each source tree (this one by default; e.g. an export of the commit before ragged
masks with ``git archive <commit> | tar -x -C /tmp/old``) two fresh processes measure:

- ingest: ``tasks.data.ingest.ingest_dataset`` (one process, shard after shard, what a Dask worker
  does per shard), peak RSS growth over the process after its imports;
- read: ``open_dataset`` then ``original_mask`` of one small image of that shard, peak RSS
  growth over the opened dataset, and the read's time.

Peak RSS is ``ru_maxrss`` (Linux: KiB), so each figure is a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_voc(root: Path, n: int, small: int, big: int) -> Path:
    from PIL import Image

    if (root / "done").exists():
        return root
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    stems = [f"img{k:03d}" for k in range(n)]
    for k, stem in enumerate(stems):
        side = big if k == n // 2 else small
        ramp = np.linspace(0, 255, side, dtype=np.float32)
        rgb = np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{stem}.jpg", quality=90)
        mask = np.zeros((side, side), np.uint8)
        mask[side // 4: side // 2, side // 3: 3 * side // 4] = 1 + k % 5
        mask[: side // 10, : side // 10] = 255
        Image.fromarray(mask, mode="P").save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(stems))
    (root / "done").touch()
    return root


def child(mode: str, root: str, store_url: str, n: int) -> dict:
    from tasks.data import ingest, store

    base = _maxrss_mib()
    if mode == "ingest":
        t0 = time.perf_counter()
        summary = ingest.ingest_dataset("voc", root, store_url, "d", splits=["train"],
                                        size=144, shard_size=n)
        return {"ingested": summary["ingested"], "seconds": time.perf_counter() - t0,
                "base_mib": base, "peak_mib": _maxrss_mib()}
    ds = store.open_dataset(store_url, "d")
    base = _maxrss_mib()
    t0 = time.perf_counter()
    mask = ds.original_mask("img000")
    return {"shape": list(mask.shape), "seconds": time.perf_counter() - t0, "base_mib": base,
            "peak_mib": _maxrss_mib(),
            "original_masks_on_disk_mib": store._nbytes(
                store._root(store_url, mode="r"),
                f"datasets/d/{ds.version}/original_masks") / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big", type=int, default=4000)
    p.add_argument("--small", type=int, default=144)
    p.add_argument("--n", type=int, default=64, help="images, and rows per shard")
    p.add_argument("--tree", action="append", default=[],
                   help="a source tree to measure (default: this one); repeatable")
    p.add_argument("--workdir", default="/tmp/ragged-masks-bench")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root, args.store, args.n)))
        return
    work = Path(args.workdir)
    root = make_voc(work / f"voc-{args.n}-{args.small}-{args.big}", args.n, args.small,
                    args.big)
    here = str(Path(__file__).resolve().parents[1])
    padded = args.n * args.big * args.big / 2**20
    print(f"{args.n - 1} images of {args.small} px + one of {args.big}x{args.big}, one shard "
          f"of {args.n}: padded original masks of that shard = {padded:.0f} MiB")
    for k, tree in enumerate(args.tree or [here]):
        store_url = str(work / f"store-{k}-{args.n}-{args.small}-{args.big}.zarr")
        subprocess.run(["rm", "-rf", store_url], check=True)
        out = {}
        for mode in ("ingest", "read"):
            done = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--root",
                 str(root), "--store", store_url, "--n", str(args.n)],
                capture_output=True, text=True, cwd=tree, env={**os.environ, "PYTHONPATH": tree})
            if done.returncode:
                raise SystemExit(done.stderr)
            out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        i, r = out["ingest"], out["read"]
        print(f"{tree}:\n  ingest: peak RSS {i['peak_mib']:.0f} MiB "
              f"(+{i['peak_mib'] - i['base_mib']:.0f} over imports), {i['seconds']:.1f} s\n"
              f"  read one {r['shape'][0]}x{r['shape'][1]} original mask: "
              f"+{r['peak_mib'] - r['base_mib']:.1f} MiB peak RSS, "
              f"{1000 * r['seconds']:.1f} ms; original_masks on disk "
              f"{r['original_masks_on_disk_mib']:.2f} MiB")


if __name__ == "__main__":
    main()
