"""Ingest and episode-read benchmarks. Prints ratios of variants measured side by side.

    .venv/bin/python benchmarks/ingest.py [--images 2000] [--repeats 3] [--parts abc]
                                          [--e2e-images 5000] [--sources voc500 --size 417]

(a) ingest scaling: the real Prefect flow on 1 and 2 Dask workers vs a bare one-process
    decode + resize loop and the shard function in one process over the same files, with the
    flow's CPU by process (its overhead = flow CPU - shard function CPU); with --e2e-images
    the same once more, end to end, at that size; (b) random 1-way 1-shot episode reads from the
    store (cold and warm shard cache) vs per-episode PIL loading; (c) peak RSS of the shard
    ingest path at N and 4N images. Variants are interleaved and each figure is the median of
    --repeats runs, because the box is shared and timings are noisy: read the ratios.
Sources: the synthetic benchmark's 144 px squares (``--sources synth``, train and val), or
VOC-like 500x375 JPEGs (``--sources voc500``, one split; `benchmarks/reads.py` makes them), where
decoding weighs more against the store's own cost per image. Generated data, stores and Prefect
state live under --workdir (it git-ignores itself).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from tables import table  # a sibling module: the benchmarks run as scripts

from tasks.data import ingest, store
from tasks.data.readers import Item, Reader, make_reader

NAME = "bench"
SPLITS = ["train", "val"]
CORES = len(os.sched_getaffinity(0))


def synth_voc(workdir: Path, n: int, size: int, seed: int, sources: str = "synth") -> Path:
    """The synthetic benchmark (n images, 20 % val) in VOC layout, or (``sources="voc500"``) n
    VOC-like 500x375 items in one split; generated once and cached."""
    from tasks.data.synth import synthesize

    if sources == "voc500":
        from reads import write_sources  # a sibling module

        t0 = time.perf_counter()
        root = write_sources(workdir / f"voc500-{n}-s{seed}", n, 500, 375, seed)
        print(f"VOC-like sources: {root} ({time.perf_counter() - t0:.1f} s)")
        return root

    root = workdir / f"synth-{n}-{size}-s{seed}"
    t0 = time.perf_counter()
    synthesize(root, n_train=n - n // 5, n_val=n // 5, size=size, seed=seed, progress=True)
    print(f"synthetic data: {root} ({time.perf_counter() - t0:.1f} s)")
    return root / "voc"


def replicate(voc: Path, out: Path, times: int) -> Path:
    """A VOC folder of `times` x the items of `voc`, hard-linked under new stems, one split."""
    items = [i for s in SPLITS for i in make_reader("voc", voc, s).list_items()]
    listing = out / "ImageSets" / "Segmentation" / "train.txt"
    if listing.exists() and len(listing.read_text().split()) == len(items) * times:
        return out
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / d).mkdir(parents=True, exist_ok=True)
    stems = []
    for k in range(times):
        for item in items:
            stem = f"r{k}_{item.id}"
            for src, dst in ((item.image_path, out / "JPEGImages" / f"{stem}.jpg"),
                             (str(item.label), out / "SegmentationClass" / f"{stem}.png")):
                if not dst.exists():
                    try:
                        os.link(src, dst)
                    except OSError:
                        os.symlink(os.path.abspath(src), dst)
            stems.append(stem)
    listing.write_text("\n".join(stems) + "\n")
    return out


def voc_readers(voc: Path, splits: list[str]) -> list[Reader]:
    return [make_reader("voc", voc, s) for s in splits]


STANDING_PIDS: list[int] = []  # the workers of part (a)'s standing cluster, while it runs


def cpu_by_role() -> dict[str, float]:
    """CPU seconds so far of this process (the flow and, for a LocalCluster, the Dask
    scheduler), its reaped children (Dask workers once their cluster closed), the Prefect
    server (started by prefect_api() unless PREFECT_API_URL is set) and the workers of the
    standing cluster (alive, so not yet in the reaped children)."""
    roles = {"standing": 0.0}
    for pid in STANDING_PIDS:
        with contextlib.suppress(psutil.Error):
            roles["standing"] += sum(psutil.Process(pid).cpu_times()[:2])
    for role, who in (("flow", resource.RUSAGE_SELF), ("workers", resource.RUSAGE_CHILDREN)):
        usage = resource.getrusage(who)
        roles[role] = usage.ru_utime + usage.ru_stime
    roles["server"] = 0.0
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "server" in p.cmdline():
                roles["server"] += sum(p.cpu_times()[:2])
    return roles


def cpu_seconds() -> float:
    """CPU time of this process, its reaped children (Dask workers) and the Prefect server."""
    return sum(cpu_by_role().values())


def bare_loop(items: list[Item], reader_of: dict[str, Reader], size: int) -> None:
    """Decode + resize every item in this process, with no store and no framework."""
    for item in items:
        image, mask = reader_of[item.split].load(item)
        ingest.resize_pair(image, mask, size)


class Watcher(threading.Thread):
    """Polls the store's finished-shard flags and the RSS of spawned (Dask worker) processes."""

    def __init__(self, url: str, version: str, every: float = 0.25):
        super().__init__(daemon=True)
        self.url, self.version, self.every = url, version, every
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, int]] = []  # (seconds since t0, shards done)
        self.worker_rss = 0
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(self.every):
            try:
                done = len(store.done_shards(self.url, NAME, self.version))
            except Exception:  # noqa: BLE001 - not created yet
                done = 0
            self.samples.append((time.perf_counter() - self.t0, done))
            for p in me.children(recursive=True):
                try:
                    if "spawn_main" in " ".join(p.cmdline()):
                        self.worker_rss = max(self.worker_rss, p.memory_info().rss)
                except psutil.Error:
                    pass


def timed_flow(workers: int, voc: Path, url: str, version: str, n_shards: int,
               args: argparse.Namespace, dask_address: str | None = None) -> dict[str, float]:
    from flows.ingest import run_ingest

    shutil.rmtree(url, ignore_errors=True)
    cpu = cpu_by_role()
    watch = Watcher(url, version)
    watch.start()
    summary = run_ingest(workers=workers, dask_address=dask_address, source="voc",
                         root=str(voc), store_url=url, name=NAME, splits=SPLITS, size=args.size,
                         shard_size=args.shard_size, progress=False)
    total = time.perf_counter() - watch.t0
    watch.stop.set()
    watch.join()
    cpu = {k: v - cpu[k] for k, v in cpu_by_role().items()}
    standing = cpu.pop("standing")  # idle unless this run used them
    if dask_address:
        cpu["workers"] += standing
    assert summary["complete"] and summary["ingested"] == summary["listed"], summary
    seen = [(t, d) for t, d in watch.samples if d > 0] or [(total, n_shards)]
    t_first, d_first = seen[0]
    last = next((s for s in seen if s[1] == n_shards), (total, n_shards))
    steady = (last[1] - d_first) * args.shard_size / max(last[0] - t_first, 1e-9)
    return {"total": total, "first": t_first, "tail": total - last[0], "steady": steady,
            "cpu": sum(cpu.values()), **{f"cpu_{k}": v for k, v in cpu.items()},
            "worker_rss": watch.worker_rss / 2**20}


def measure(fn: Callable[[], object]) -> dict[str, float]:
    cpu, t0 = cpu_seconds(), time.perf_counter()
    fn()
    return {"total": time.perf_counter() - t0, "cpu": cpu_seconds() - cpu}


def part_a(args: argparse.Namespace, voc: Path, repeats: int, tag: str = "a",
           stages: bool = True) -> dict[str, float]:
    """Bare loop, shard function, flow on 1 and on 2 Dask workers, interleaved, over ``voc``."""
    from flows.runtime import prefect_api

    readers = voc_readers(voc, SPLITS)
    plan = ingest.plan_ingest(readers, NAME, size=args.size, shard_size=args.shard_size)
    n, version = len(plan.items), plan.spec.version
    stores = args.workdir / "stores"
    serial_url = str(stores / "serial.zarr")
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "serial": [], "1": [], "2": [],
                                               "2s": []}
    t0 = time.perf_counter()
    with prefect_api(), standing_cluster(2) as standing_address:
        server_s = time.perf_counter() - t0
        for rep in range(repeats):  # interleaved: each repeat runs every variant once
            runs["bare"].append(measure(lambda: bare_loop(plan.items, plan.readers, args.size)))
            shutil.rmtree(serial_url, ignore_errors=True)
            runs["serial"].append(measure(
                lambda: serial_ingest(voc, serial_url, args.size, args.shard_size, SPLITS)))
            for w in (1, 2):
                runs[str(w)].append(timed_flow(w, voc, str(stores / f"flow{w}.zarr"), version,
                                               plan.spec.n_shards, args))
            runs["2s"].append(timed_flow(2, voc, str(stores / "flow2s.zarr"), version,
                                         plan.spec.n_shards, args, standing_address))
            print(f"  repeat {rep + 1}/{repeats}: " + ", ".join(
                f"{k} {n / r[-1]['total']:.0f} img/s" for k, r in runs.items()), flush=True)
    for leftover in ("serial.zarr", "flow1.zarr", "flow2s.zarr"):  # flow2.zarr is kept for part (b)
        shutil.rmtree(stores / leftover, ignore_errors=True)
    med = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in runs.items()}
    b, b_cpu = n / med["bare"]["total"], med["bare"]["cpu"]
    shard_fn_cpu = med["serial"]["cpu"]
    labels = {"bare": "bare loop: load + resize, 1 process",
              "serial": "shard fn: + store write, 1 process",
              "1": "flow, 1 Dask worker", "2": "flow, 2 Dask workers",
              "2s": "flow, 2 workers of a standing cluster"}
    rows: list[list[object]] = []
    for k, m in med.items():
        flow = k in FLOWS
        rows.append([labels[k], n / m["total"], n / m["total"] / b, 1e3 * m["cpu"] / n,
                     1e3 * (m["cpu"] - shard_fn_cpu) / n if flow else "-",
                     b_cpu / m["cpu"] * CORES,
                     m["first"] if flow else "-", m["tail"] if flow else "-",
                     m["steady"] if flow else "-", m["steady"] / b if flow else "-"])
    table(f"({tag}) ingest scaling: {n} images at {args.size} px, shards of {args.shard_size}, "
          f"median of {repeats}",
          ["variant", "img/s", "x bare", "CPU ms/img", "flow overhead CPU ms/img",
           f"x bare bound, {CORES} cores", "s to 1st shard", "s tail", "img/s steady",
           "x bare steady"], rows)
    print(f"\nCPU ms/img: all processes (this one, Dask workers, the Prefect server). 'flow "
          "overhead' = flow CPU - shard fn CPU (both list and fingerprint the source).\n'bound' "
          f"= {CORES} x bare CPU / variant CPU, the best ratio its CPU cost allows. 's to 1st "
          "shard': start-up (cluster, flow, one shard);\n'steady': images of the shards finished "
          "after the first / time from the first to the last; 'tail': last shard -> flow "
          f"returned.\nPrefect server start-up (once, not timed above): {server_s:.1f} s. "
          f"Dask worker peak RSS: 1 worker {med['1']['worker_rss']:.0f} MiB, 2 workers "
          f"{med['2']['worker_rss']:.0f} MiB.")
    if stages:
        table(f"({tag}') where the flow's CPU goes, ms per image ({n} images)",
              ["variant", "this process (flow, Dask scheduler)", "Dask workers",
               "Prefect server", "total"],
              [[labels[k], 1e3 * med[k]["cpu_flow"] / n, 1e3 * med[k]["cpu_workers"] / n,
                1e3 * med[k]["cpu_server"] / n, 1e3 * med[k]["cpu"] / n] for k in FLOWS]
              + [[labels["serial"], 1e3 * shard_fn_cpu / n, "-", "-", 1e3 * shard_fn_cpu / n]])
    two = med["2"]
    return {"n": n, "e2e": n / two["total"] / b, "steady": two["steady"] / b,
            "bound": b_cpu / two["cpu"] * CORES, "scaling": two["steady"] / med["1"]["steady"],
            "overhead": 1e3 * (two["cpu"] - shard_fn_cpu) / n,
            "overhead1": 1e3 * (med["1"]["cpu"] - shard_fn_cpu) / n,
            "standing": 1e3 * (med["2s"]["cpu"] - shard_fn_cpu) / n,
            "standing_steady": med["2s"]["steady"] / b, "standing_e2e": n / med["2s"]["total"] / b,
            "extra_cpu": {w: med[w]["cpu"] - shard_fn_cpu for w in ("1", "2")}}


FLOWS = ("1", "2", "2s")


@contextlib.contextmanager
def standing_cluster(workers: int):  # -> Iterator[str]
    """A LocalCluster that outlives the flow runs, as a deployment's `FSS_DASK_ADDRESS` cluster
    does; its workers have imported the ingest code once, as after an earlier run."""
    from flows.runtime import dask_client

    with dask_client(workers, dask_address=None) as client:
        client.run(lambda: __import__("tasks.data.ingest"))
        STANDING_PIDS[:] = list(client.run(os.getpid).values())
        try:
            yield client.scheduler.address
        finally:
            STANDING_PIDS.clear()


def serial_ingest(root: Path, url: str, size: int, shard_size: int, splits: list[str]) -> int:
    """The shard function path of the flow's workers, one shard after another in this process."""
    plan = ingest.plan_ingest(voc_readers(root, splits), NAME, size=size, shard_size=shard_size)
    store.create_dataset(url, plan.spec)
    shards = range(plan.spec.n_shards)
    ingest.ingest_shards(url, NAME, plan.spec.version, shards,
                         [plan.shard_items(k) for k in shards], plan.readers, size)
    assert store.finalize_dataset(url, NAME, plan.spec.version)["complete"]
    return len(plan.items)


def part_b(args: argparse.Namespace, voc: Path) -> dict[str, float]:
    url = str(args.workdir / "stores" / "flow2.zarr")  # left by part (a), else made here
    plan = ingest.plan_ingest(voc_readers(voc, SPLITS), NAME, size=args.size,
                              shard_size=args.shard_size)
    try:
        store.open_dataset(url, NAME, plan.spec.version)
    except store.StoreError:
        shutil.rmtree(url, ignore_errors=True)
        serial_ingest(voc, url, args.size, args.shard_size, SPLITS)
    items = {i.id: i for i in plan.items}
    rng = np.random.default_rng(args.seed)
    ids = store.open_dataset(url, NAME, plan.spec.version).ids
    episodes = [[ids[j] for j in rng.choice(len(ids), 2, replace=False)]
                for _ in range(args.episodes)]
    size = args.size

    def pil(image_id: str) -> None:  # HSNet-style: decode and resize at every episode
        item = items[image_id]
        with Image.open(item.image_path) as im:
            np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        with Image.open(str(item.label)) as m:
            np.asarray(m.resize((size, size), Image.Resampling.NEAREST))

    def store_pair(ds: store.Dataset) -> Callable[[str], object]:
        return lambda image_id: (ds.image(image_id), ds.mask(image_id))

    def run(read: Callable[[str], object]) -> float:
        t0 = time.perf_counter()
        for episode in episodes:
            for image_id in episode:
                read(image_id)
        return args.episodes / (time.perf_counter() - t0)

    res: dict[str, list[float]] = {"pil": [], "open": [], "cold": [], "warm": []}
    for _ in range(args.repeats):
        res["pil"].append(run(pil))
        t0 = time.perf_counter()
        ds = store.open_dataset(url, NAME, plan.spec.version)  # fresh: empty shard cache
        res["open"].append(time.perf_counter() - t0)
        res["cold"].append(run(store_pair(ds)))
        res["warm"].append(run(store_pair(ds)))
    m = {k: statistics.median(v) for k, v in res.items()}
    table(f"(b) episode reads: {args.episodes} random 1-way 1-shot episodes (2 images + 2 masks)"
          f" over {len(ids)} images, seed {args.seed}, median of {args.repeats}",
          ["variant", "episodes/s", "x PIL"],
          [["PIL per episode (decode + resize)", m["pil"], 1.0],
           ["store, cold (fresh Dataset, first pass)", m["cold"], m["cold"] / m["pil"]],
           ["store, warm (shard cache populated)", m["warm"], m["warm"] / m["pil"]]])
    print(f"\nopen_dataset (index load) took {m['open'] * 1e3:.0f} ms, not in 'cold'.")
    return {"cold": m["cold"] / m["pil"], "warm": m["warm"] / m["pil"]}


def part_c(args: argparse.Namespace, voc: Path) -> dict[str, float]:
    peaks = {}
    for times in (1, args.mem_factor):
        root = replicate(voc, args.workdir / f"voc-x{times}", times)
        url = str(args.workdir / "stores" / f"mem-x{times}.zarr")
        shutil.rmtree(url, ignore_errors=True)
        cmd = [sys.executable, __file__, "--child-ingest", str(root), "--child-store", url,
               "--size", str(args.size), "--shard-size", str(args.shard_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[times] = json.loads(out.strip().splitlines()[-1])
        shutil.rmtree(url, ignore_errors=True)
    small, big = peaks[1], peaks[args.mem_factor]
    table("(c) peak RSS of the shard ingest path (one subprocess per size, serial shards)",
          ["images", "seconds", "RSS after imports MiB", "peak RSS MiB", "peak - imports MiB"],
          [[p["n"], p["seconds"], p["base"], p["peak"], p["peak"] - p["base"]]
           for p in (small, big)])
    ratio = big["peak"] / small["peak"]
    growth = (big["peak"] - big["base"]) / (small["peak"] - small["base"])
    print(f"\npeak RSS {big['n']} vs {small['n']} images: {ratio:.2f}x "
          f"(growth above imports {growth:.2f}x)")
    return {"ratio": ratio, "n_small": small["n"], "n_big": big["n"]}


def peak_rss_mib() -> float:
    """This process's peak RSS. Not getrusage: its ru_maxrss (and RUSAGE_CHILDREN's) counts the
    parent's RSS at fork/exec, which here is the benchmark's own shard caches."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024  # kB
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_ingest(root: Path, url: str, size: int, shard_size: int) -> None:
    base = psutil.Process().memory_info().rss / 2**20
    t0 = time.perf_counter()
    n = serial_ingest(root, url, size, shard_size, ["train"])
    peak = peak_rss_mib()
    print(json.dumps({"n": n, "seconds": time.perf_counter() - t0, "base": base, "peak": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="synthetic images (20 %% val)")
    p.add_argument("--size", type=int, default=144, help="canonical size and synthetic size")
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--e2e-images", type=int, default=0,
                   help="also run (a) once end to end at this many images (e.g. 5000)")
    p.add_argument("--episodes", type=int, default=500)
    p.add_argument("--mem-factor", type=int, default=4, help="(c) compares N and N x this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="abc", help="which parts to run, e.g. 'ab'")
    p.add_argument("--sources", choices=["synth", "voc500"], default="synth",
                   help="144 px synthetic squares, or VOC-like 500x375 JPEGs (use --size 417)")
    p.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".work")
    p.add_argument("--child-ingest", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_ingest:
        return child_ingest(args.child_ingest, args.child_store, args.size, args.shard_size)

    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / ".gitignore").write_text("*\n")
    os.environ.setdefault("FSS_HOME", str(args.workdir / "fss"))  # Prefect server DB and log
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # inherited by Dask workers
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    print(f"$ {Path(sys.executable).name} benchmarks/ingest.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} cores "
          f"({len(os.sched_getaffinity(0))} usable), {psutil.virtual_memory().total / 2**30:.0f}"
          f" GiB, load average {os.getloadavg()[0]:.1f}; Python {platform.python_version()}")
    if args.sources == "voc500":
        SPLITS[:] = ["train"]
    voc = synth_voc(args.workdir, args.images, args.size, args.seed, args.sources)
    a = part_a(args, voc, args.repeats) if "a" in args.parts else None
    b = part_b(args, voc) if "b" in args.parts else None
    c = part_c(args, voc) if "c" in args.parts else None
    e = None
    if args.e2e_images:
        big = synth_voc(args.workdir, args.e2e_images, args.size, args.seed, args.sources)
        e = part_a(args, big, 1, tag="a, end to end")

    print(f"\n## Summary ({args.images} {args.sources} images at {args.size} px, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end)\n")
    print("| benchmark | measured | goal |\n| --- | --- | --- |")
    if a:
        print(f"| ingest flow, 2 workers vs bare 1-process loop, steady state ({a['n']} images) "
              f"| {a['steady']:.2f}x | >= 1.6x |")
        print(f"| ingest flow, 2 workers vs bare, end to end ({a['n']} images) | "
              f"{a['e2e']:.2f}x | - |")
        print(f"| ingest flow, 2 workers vs bare: bound from CPU cost on {CORES} cores | "
              f"{a['bound']:.2f}x | >= 1.6x |")
        print(f"| ingest flow, 2 vs 1 worker (steady state) | {a['scaling']:.2f}x | >= 1.7x |")
        print(f"| flow overhead, CPU ms per image (2 workers / 1 worker) | "
              f"{a['overhead']:.2f} / {a['overhead1']:.2f} | <= 0.5 |")
        print(f"| 2 workers of a standing cluster: vs bare steady / end to end; flow overhead "
              f"CPU ms per image | {a['standing_steady']:.2f}x / {a['standing_e2e']:.2f}x; "
              f"{a['standing']:.2f} | - |")
    if e:
        print(f"| ingest flow, 2 workers vs bare, end to end ({e['n']} images) | "
              f"{e['e2e']:.2f}x | >= 1.2x |")
        print(f"| flow overhead, CPU ms per image, 2 workers ({e['n']} images) | "
              f"{e['overhead']:.2f} | <= 0.5 |")
        if a and e["n"] > a["n"]:  # the start-up costs cancel out: what each more image adds
            slope = {w: 1e3 * (e["extra_cpu"][w] - a["extra_cpu"][w]) / (e["n"] - a["n"])
                     for w in ("1", "2")}
            print(f"| flow overhead per additional image, CPU ms ({a['n']} -> {e['n']} images; "
                  f"2 workers / 1 worker) | {slope['2']:.2f} / {slope['1']:.2f} | <= 0.5 |")
    if b:
        print(f"| episode reads, store vs PIL (cold / warm cache) | {b['cold']:.2f}x / "
              f"{b['warm']:.1f}x | >= 3x |")
    if c:
        print(f"| ingest peak RSS, {c['n_big']} vs {c['n_small']} images | {c['ratio']:.2f}x | "
              "~1.0x (flat) |")


if __name__ == "__main__":
    main()
