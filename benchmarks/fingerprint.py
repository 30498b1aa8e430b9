"""What content fingerprints cost: listing N small files by size only vs by a hash of the bytes.

    .venv/bin/python benchmarks/fingerprint.py [--files 10000] [--kb 30] [--repeats 3]

Writes N distinct small JPEG files (VOC-like 144 px photos are ~20-40 KB) under --workdir and
times, interleaved, per file:

- size only: ``os.stat`` (what fingerprints used before issue 12);
- header: ``os.stat`` + the image header (what listing already read for the sizes);
- hashed: `tasks.data.readers.scan_files` (blake2b-128 of the bytes plus the header, in one read),
  as listing does, on 1 thread, on a pool (2 and ``SCAN_THREADS``) and as listing calls it
  (``threads=None``: one thread unless its first `SCAN_PROBE` reads waited on the device).

Each hashed variant runs warm (the files in the page cache: this measures CPU) and cold (the
files evicted from the page cache first with ``posix_fadvise(DONTNEED)``: the device's latency
too, which a thread pool hides). Figures are medians of --repeats; the box may be shared, so
the load average is printed.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.data.readers import SCAN_PROBE, SCAN_THREADS, scan_files


def make_files(folder: Path, n: int, kb: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{k:06d}.jpg") for k in range(n)]
    if all(os.path.isfile(p) for p in paths):
        return paths
    rng = np.random.default_rng(0)
    # A few real JPEGs of about --kb KB, made distinct per file by a trailing counter (JPEG
    # decoders ignore bytes after the end-of-image marker).
    side = int(np.sqrt(kb * 1024 / 1.5))
    blobs = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    for k, path in enumerate(paths):
        with open(path, "wb") as fh:
            fh.write(blobs[k % len(blobs)] + k.to_bytes(8, "little"))
    return paths


def size_only(paths: list[str]) -> list[int]:
    return [os.stat(p).st_size for p in paths]


def with_header(paths: list[str]) -> list[tuple[int, tuple[int, int]]]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append((os.stat(p).st_size, im.size))
    return out


def evict(paths: list[str]) -> None:
    """Drop the files from the page cache (clean pages; no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--kb", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=str(Path(__file__).parent / ".work" / "fingerprint"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work.parent / ".gitignore").write_text("*\n")
    paths = make_files(work / f"{args.files}x{args.kb}kb", args.files, args.kb)
    mb = sum(os.path.getsize(p) for p in paths) / 1e6
    print(f"{len(paths)} files, {mb:.0f} MB, {len(os.sched_getaffinity(0))} cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    variants = {
        "size only (os.stat)": size_only,
        "stat + header": with_header,
        "blake2b only, 1 thread": lambda p: scan_files([], p, threads=1),
        "blake2b + header, 1 thread": lambda p: scan_files(p, threads=1),
    }
    for threads in sorted({2, SCAN_THREADS} - {1}):
        variants[f"blake2b + header, {threads} threads"] = (
            lambda p, t=threads: scan_files(p, threads=t))
    variants["blake2b + header, as listing (auto)"] = scan_files
    for name in [k for k in variants if k.startswith("blake2b + header")]:
        variants[f"{name}, cold"] = variants[name]
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            if name.endswith(", cold"):
                evict(paths)
            t0 = time.perf_counter()
            fn(paths)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["size only (os.stat)"])
    print(f"{'variant':<44} {'s':>7} {'files/s':>10} {'MB/s':>8} {'x size-only':>12}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<44} {t:7.3f} {len(paths) / t:10.0f} {mb / t:8.0f} {t / base:12.1f}")
    print(f"'auto' probes the first {SCAN_PROBE} files on one thread, then uses "
          f"{SCAN_THREADS} threads if they were read from the device.")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
