"""A Dask cluster on SLURM for the fss flows, with dask-jobqueue.

This process runs the Dask scheduler (on the login/submit node) and submits one SLURM job per
worker group; it writes the scheduler address for `FSS_DASK_ADDRESS` and keeps the cluster up
until it is stopped (Ctrl-C or SIGTERM), which cancels the jobs.

    # CPU workers: 4 jobs of 8 single-threaded worker processes each
    python infra/slurm/cluster.py --interface ib0 --jobs 4 --address-file .fss/dask-address &
    export FSS_DASK_ADDRESS=$(cat .fss/dask-address)   # once the file exists
    fss ingest ... # or any flow: its Dask tasks now run on the SLURM workers

    # GPU workers: one job per GPU (--gres=gpu:1), one worker per job with --resources GPU=1
    python infra/slurm/cluster.py --interface ib0 --gpu --jobs 8 --address-file ...

    # GPU workers joining the scheduler of an existing (CPU) cluster: print the job script
    python infra/slurm/cluster.py --gpu --attach tcp://10.1.2.3:8786 --print-job-script > gpu.sh
    sbatch gpu.sh   # once per GPU worker wanted

    # See what would be submitted, without SLURM: --print-job-script

dask-jobqueue is imported inside main() only, so this file compiles and imports where it is not
installed (pip install dask-jobqueue on the submit host). The workers run `--python`, an
interpreter that has this project and prefect-dask installed, on a shared file system.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

# Exported into every job (when set here) so that tasks on the workers report to the same
# Prefect API and MLflow server as the flow that submitted them.
FORWARDED_ENV = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="SLURM jobs to submit (default 2)")
    p.add_argument("--gpu", action="store_true",
                   help="GPU jobs: --gres=gpu:1, one worker per job with --resources GPU=1")
    p.add_argument("--interface", default=os.environ.get("FSS_SLURM_INTERFACE"),
                   help="network interface that compute nodes reach this host on (ib0, eth0); "
                        "required to run a cluster, as workers cannot reach 127.0.0.1")
    p.add_argument("--queue", help="SLURM partition (-p)")
    p.add_argument("--account", help="SLURM account (-A)")
    p.add_argument("--walltime", default="04:00:00")
    p.add_argument("--cores", type=int, default=8, help="CPU cores per job")
    p.add_argument("--memory", default="32GB", help="memory per job")
    p.add_argument("--processes", type=int, default=None,
                   help="worker processes per CPU job (default: one per core, 1 thread each)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter on the compute nodes that has this project installed")
    p.add_argument("--log-directory", default="slurm-logs")
    p.add_argument("--dashboard-address", default="127.0.0.1:8787",
                   help="scheduler dashboard; local by default (ssh -L to reach it)")
    p.add_argument("--address-file", type=Path,
                   help="write the scheduler address here (for FSS_DASK_ADDRESS)")
    p.add_argument("--wait-workers", type=int, default=0,
                   help="wait until this many workers joined before writing the address")
    p.add_argument("--attach", metavar="ADDRESS",
                   help="with --print-job-script: a job script for an existing scheduler")
    p.add_argument("--print-job-script", action="store_true",
                   help="print the sbatch script and exit; submits nothing")
    return p.parse_args(argv)


def job_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The per-job settings that SLURMCluster and SLURMJob share."""
    prologue = [f"export {name}={shlex.quote(os.environ[name])}" for name in FORWARDED_ENV
                if name in os.environ]
    kwargs: dict[str, Any] = {
        "queue": args.queue,
        "account": args.account,
        "walltime": args.walltime,
        "memory": args.memory,
        "python": args.python,
        "log_directory": args.log_directory,
        "job_script_prologue": prologue,
        "interface": args.interface,
    }
    if args.gpu:
        # One GPU per job and one single-threaded worker per GPU (cores=1, processes=1): SLURM
        # sets CUDA_VISIBLE_DEVICES for the job, and GPU=1 lets Dask run at most one task
        # annotated with resources={"GPU": 1} on it at a time. The job still books --cores CPUs
        # (job_cpu) for the torch threads and data loading inside that task.
        kwargs.update(cores=1, processes=1, job_cpu=args.cores,
                      job_extra_directives=["--gres=gpu:1"],
                      worker_extra_args=["--resources", "GPU=1"])
    else:
        # One single-threaded worker process per core: image decoding and torch work scale by
        # processes here, not threads.
        kwargs.update(cores=args.cores, processes=args.processes or args.cores)
    return kwargs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported here, not at module level: only the submit host needs dask-jobqueue.
    from dask_jobqueue import SLURMCluster

    if args.attach:
        if not args.print_job_script:
            sys.exit("--attach only prints a job script (add --print-job-script)")
        # Every sbatch of this one script must give its worker a unique name: the job id.
        job = SLURMCluster.job_cls(scheduler=args.attach, name="fss-gpu-${SLURM_JOB_ID}",
                                   **job_kwargs(args))
        print(job.job_script())
        return 0
    if not args.interface and not args.print_job_script:
        sys.exit("give --interface (or FSS_SLURM_INTERFACE): the interface compute nodes "
                 "reach this host on; the scheduler would otherwise be unreachable")

    scheduler_options = {"dashboard_address": args.dashboard_address}
    if args.print_job_script:
        # A throwaway scheduler, only there to render the script: loopback, any free port.
        scheduler_options = {"dashboard_address": "127.0.0.1:0"}
        if not args.interface:
            scheduler_options["host"] = "127.0.0.1"
    cluster = SLURMCluster(scheduler_options=scheduler_options, **job_kwargs(args))
    try:
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        if args.wait_workers:
            from distributed import Client

            with Client(cluster) as client:
                client.wait_for_workers(args.wait_workers)
        address = cluster.scheduler_address
        if args.address_file:
            args.address_file.parent.mkdir(parents=True, exist_ok=True)
            args.address_file.write_text(address + "\n")
        print(f"export FSS_DASK_ADDRESS={address}", flush=True)
        print(f"{args.jobs} {'GPU' if args.gpu else 'CPU'} jobs submitted; Ctrl-C cancels them",
              flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.close()  # cancels the SLURM jobs (scancel)
        if args.address_file and not args.print_job_script:
            args.address_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
