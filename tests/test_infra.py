"""infra/: manifests, scripts, the SLURM example and the Dockerfile, checked as far as this machine
allows (no Docker engine, Kubernetes or SLURM here), plus the Dask scripts run for real (slow)."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
SCRIPTS = sorted(INFRA.rglob("*.sh"))
MANIFESTS = sorted((INFRA / "kubernetes").glob("*.yaml"))
# Scripts that start something listening on a port, and how to run them without starting it.
SERVER_SCRIPTS = {
    "dask/start-scheduler.sh": [],
    "dask/start-workers.sh": [],
    "mlflow/start-server.sh": [],
    "prefect/start-server.sh": [],
}
# Variables that would override the scripts' bind defaults.
BIND_ENV = ("FSS_DASK_HOST", "MLFLOW_HOST", "PREFECT_SERVER_API_HOST", "FSS_DASK_ADDRESS")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[dict]:
    return [d for p in MANIFESTS if p.name != "kustomization.yaml" for d in _docs(p)]


def _dry_run(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in BIND_ENV}
    clean["PYTHON"] = sys.executable
    out = subprocess.run(["bash", str(INFRA / script), *args, "--dry-run"],
                         env={**clean, **(env or {})}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


# ---------------------------------------------------------------------------------- manifests

def test_every_manifest_parses_and_names_itself() -> None:
    assert {p.name for p in MANIFESTS} >= {"dask-cluster.yaml", "mlflow.yaml",
                                           "prefect-server.yaml", "kustomization.yaml"}
    for path in MANIFESTS:
        docs = _docs(path)
        assert docs, path
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), path
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = _docs(INFRA / "kubernetes" / "kustomization.yaml")
    listed = set(kust["resources"])
    present = {p.name for p in MANIFESTS} - {"kustomization.yaml"}
    assert listed == present


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def test_dask_cluster_has_cpu_and_gpu_worker_groups() -> None:
    docs = _all_docs()
    (cluster,) = [d for d in docs if d["kind"] == "DaskCluster"]
    groups = [d for d in docs if d["kind"] == "DaskWorkerGroup"]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    assert cluster["spec"]["scheduler"]["spec"]["containers"]
    assert cluster["spec"]["scheduler"]["service"]["ports"][0]["port"] == 8786

    # The default (CPU) group: single-threaded workers, no GPU.
    (cpu,) = cluster["spec"]["worker"]["spec"]["containers"]
    assert cpu["args"][:2] == ["dask", "worker"]
    assert "nvidia.com/gpu" not in str(cpu["resources"])
    assert cpu["args"][cpu["args"].index("--nthreads") + 1] == "1"

    (gpu_group,) = [g for g in groups if g["spec"]["cluster"] == cluster["metadata"]["name"]]
    assert gpu_group["apiVersion"] == "kubernetes.dask.org/v1"
    pod = gpu_group["spec"]["worker"]["spec"]
    (gpu,) = pod["containers"]
    assert gpu["args"][gpu["args"].index("--resources") + 1] == "GPU=1"
    assert gpu["args"][gpu["args"].index("--nthreads") + 1] == "1"
    # One GPU per pod, and so one worker per GPU. Quoted: the operator's CRD types resource
    # quantities as strings and the API server would reject an integer.
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--nworkers" not in gpu["args"]
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_dask_custom_resources_quote_every_quantity() -> None:
    for doc in _all_docs():
        if doc["kind"] not in ("DaskCluster", "DaskWorkerGroup"):
            continue
        specs = [doc["spec"]["worker"]["spec"]]
        if doc["kind"] == "DaskCluster":
            specs.append(doc["spec"]["scheduler"]["spec"])
        for spec in specs:
            for c in _containers(spec):
                for kind in ("requests", "limits"):
                    for name, q in c.get("resources", {}).get(kind, {}).items():
                        assert isinstance(q, str), f"{doc['metadata']['name']}: {name}={q!r}"


def test_services_and_their_backends() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _all_docs()}
    for name, port in (("mlflow", 5000), ("prefect-server", 4200)):
        assert docs[("Service", name)]["spec"]["ports"][0]["port"] == port
        assert ("Deployment", name) in docs
    mlflow = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]
    env = {e["name"]: e for c in _containers(mlflow) for e in c.get("env", [])}
    # The PostgreSQL URI comes from a Secret referenced by name, and artifacts go to a volume.
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert mlflow["volumes"][0]["persistentVolumeClaim"]["claimName"] in {
        n for k, n in docs if k == "PersistentVolumeClaim"}
    server = mlflow["containers"][0]["args"]
    assert server[:2] == ["mlflow", "server"] and "--artifacts-destination" in server
    assert not any(d["kind"] == "Secret" for d in docs.values()), "no Secret objects in the repo"


def test_every_pod_runs_the_project_image_as_non_root() -> None:
    for doc in _all_docs():
        if doc["kind"] in ("DaskCluster",):
            pods = [doc["spec"]["worker"]["spec"], doc["spec"]["scheduler"]["spec"]]
        elif doc["kind"] == "DaskWorkerGroup":
            pods = [doc["spec"]["worker"]["spec"]]
        elif doc["kind"] == "Deployment":
            pods = [doc["spec"]["template"]["spec"]]
        else:
            continue
        for pod in pods:
            assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
            for c in _containers(pod):
                assert c["image"].split(":")[0] in ("fss", "fss-cuda"), c["image"]


# ------------------------------------------------------------------------------------ scripts

def test_scripts_parse_and_are_strict() -> None:
    assert len(SCRIPTS) >= 7
    for script in SCRIPTS:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{script}: {out.stderr}"
        assert re.search(r"^set -euo pipefail$", script.read_text(), re.M), script


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_pass_shellcheck() -> None:
    out = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True,
                         text=True, cwd=INFRA)
    assert out.returncode == 0, out.stdout


def test_scripts_bind_loopback_by_default() -> None:
    for script in SCRIPTS:
        code = "\n".join(line for line in script.read_text().splitlines()
                         if not line.lstrip().startswith("#"))
        assert "0.0.0.0" not in code, script
        if "--host" in code:
            assert re.search(r'HOST="\$\{\w+:-127\.0\.0\.1\}"', code), script
    for script in SERVER_SCRIPTS:
        for line in _dry_run(script).splitlines():
            assert "--host 127.0.0.1" in line, (script, line)
    # Dashboards and the workers' HTTP endpoints stay on loopback too.
    assert "--dashboard-address 127.0.0.1:8787" in _dry_run("dask/start-scheduler.sh")
    assert "--dashboard-address 127.0.0.1:0" in _dry_run("dask/start-workers.sh")
    # An explicit choice is honoured.
    assert "--host 10.0.0.7" in _dry_run("dask/start-workers.sh", "--host", "10.0.0.7")
    assert "--interface ib0" in _dry_run("dask/start-scheduler.sh", "--interface", "ib0")


def test_worker_modes() -> None:
    (cpu,) = _dry_run("dask/start-workers.sh", "tcp://10.0.0.5:8786", "--nworkers", "3",
                      "--memory-limit", "4GB").splitlines()
    assert "dask worker tcp://10.0.0.5:8786 " in cpu
    for arg in ("--nworkers 3", "--nthreads 1", "--memory-limit 4GB"):
        assert arg in cpu
    assert "GPU" not in cpu and "CUDA_VISIBLE_DEVICES" not in cpu
    # GPU mode: one worker process per GPU, pinned to it, advertising one GPU.
    gpu = _dry_run("dask/start-workers.sh", "--gpus", "0,1").splitlines()
    assert len(gpu) == 2
    for i, line in enumerate(gpu):
        assert line.startswith(f"CUDA_VISIBLE_DEVICES={i} ")
        for arg in ("--resources GPU=1", "--nworkers 1", "--nthreads 1",
                    "--memory-limit 0.5000", f"-gpu{i}"):
            assert arg in line
    # The address may come from FSS_DASK_ADDRESS, as for the flows.
    assert "tcp://sched:8786" in _dry_run("dask/start-workers.sh",
                                         env={"FSS_DASK_ADDRESS": "tcp://sched:8786"})


def test_prefect_and_mlflow_scripts() -> None:
    assert "prefect server start --host 127.0.0.1 --port 4200" in _dry_run(
        "prefect/start-server.sh")
    gpu = _dry_run("prefect/start-worker.sh", "fss-gpu", "--gpu", "1")
    assert gpu.startswith("CUDA_VISIBLE_DEVICES=1 ")
    assert "--pool fss-gpu --type process" in gpu and "--limit 1" in gpu
    # The pools are the ones the deployments in prefect.yaml use.
    pools = (INFRA / "prefect" / "create-pools.sh").read_text()
    assert "for pool in fss-cpu fss-gpu" in pools and "--type process" in pools
    if (ROOT / "prefect.yaml").exists():
        used = {d["work_pool"]["name"]
                for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
        assert used <= {"fss-cpu", "fss-gpu"}
    mlflow = _dry_run("mlflow/start-server.sh")
    assert "mlflow server --host 127.0.0.1 --port 5000 --artifacts-destination" in mlflow
    assert 'MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow.db' in (
        INFRA / "mlflow" / "start-server.sh").read_text()
    # The PostgreSQL variant refuses to start without a postgresql:// URI from the environment.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_BACKEND_STORE_URI"}
    out = subprocess.run(["bash", str(INFRA / "mlflow" / "start-server-postgres.sh")], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "MLFLOW_BACKEND_STORE_URI" in out.stderr


def test_pinned_versions_match_the_package() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "prefect==3.8.8" in deps and "fastapi<0.151" in deps
    readme = (INFRA / "prefect" / "README.md").read_text()
    assert "prefect==3.8.8" in readme and "fastapi<0.151" in readme


# ------------------------------------------------------------------------------------- SLURM

def _load_slurm_example():
    path = INFRA / "slurm" / "cluster.py"
    spec = importlib.util.spec_from_file_location("fss_infra_slurm_cluster", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slurm_example_compiles_and_imports_without_dask_jobqueue(tmp_path: Path) -> None:
    import py_compile

    path = INFRA / "slurm" / "cluster.py"
    py_compile.compile(str(path), doraise=True, cfile=str(tmp_path / "cluster.pyc"))
    tree = ast.parse(path.read_text())
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = {a.name for n in top_level for a in n.names} | {
        n.module for n in top_level if isinstance(n, ast.ImportFrom)}
    assert not any(str(n).startswith("dask_jobqueue") for n in names)
    assert "dask_jobqueue" in path.read_text()  # imported inside main()

    module = _load_slurm_example()  # must not need dask_jobqueue
    gpu = module.job_kwargs(module.parse_args(["--gpu", "--interface", "ib0"]))
    assert "--gres=gpu:1" in gpu["job_extra_directives"]
    assert gpu["worker_extra_args"] == ["--resources", "GPU=1"]
    assert gpu["cores"] == gpu["processes"] == 1  # one single-threaded worker per GPU job
    cpu = module.job_kwargs(module.parse_args(["--cores", "8"]))
    assert cpu["processes"] == 8 and "job_extra_directives" not in cpu


# ------------------------------------------------------------------------------------ Docker

def test_dockerfile_structure() -> None:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    instr = [(ln.split()[0].upper(), ln) for ln in lines]
    assert instr[0][0] in ("FROM", "ARG")
    assert any(k == "FROM" and "python:3.11-slim" in ln for k, ln in instr)
    users = [ln.split()[1] for k, ln in instr if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    last_run = max(i for i, (k, _) in enumerate(instr) if k == "RUN")
    last_user = max(i for i, (k, _) in enumerate(instr) if k == "USER")
    assert last_user > last_run, "nothing may run as root after USER"
    assert any(k == "ENTRYPOINT" for k, _ in instr)
    assert any(k == "RUN" and re.search(r"pip install .*\s\.$", ln) for k, ln in instr)
    assert any(k == "ARG" and ln.startswith("ARG TORCH_INDEX_URL=") for k, ln in instr)
    # The image installs the torch version the package pins.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_pin,) = [d for d in deps if d.startswith("torch==")]
    assert f'"{torch_pin}"' in text
    # Everything COPY'd exists and is let through by the Dockerfile's own ignore file.
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    for k, ln in instr:
        if k == "COPY":
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), src
                assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, src


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run(["hadolint", str(INFRA / "docker" / "Dockerfile")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# ----------------------------------------------------------------------------------- secrets

PLACEHOLDER = re.compile(r"^([A-Z_]+|\$.*|<.*>|\.\.\.|)$")
SECRET_ASSIGN = re.compile(
    r"(?i)(password|passwd|secret|token|api_?key|access_?key)\w*\s*=\s*['\"]?([^\s'\"&;`]*)")
URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:([^@\s/]+)@")
SECRET_KEYS = re.compile(r"(?i)(password|passwd|secret|token|api_?key|access_?key)$")


def test_no_secret_looking_literals() -> None:
    files = [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for path in files:
        text = path.read_text()
        for m in SECRET_ASSIGN.finditer(text):
            assert PLACEHOLDER.match(m.group(2)), f"{path}: {m.group(0)}"
        for m in URL_CREDENTIALS.finditer(text):
            assert PLACEHOLDER.match(m.group(1)), f"{path}: {m.group(0)}"
        assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY", text), path

    def walk(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                if SECRET_KEYS.search(str(k)):
                    assert not isinstance(v, str | int), f"{where}: {k} has a literal value"
                walk(v, where)
        elif isinstance(node, list):
            for v in node:
                walk(v, where)

    for path in MANIFESTS:
        for doc in _docs(path):
            assert doc["kind"] != "Secret", path
            walk(doc, path)


# ------------------------------------------------------------------- the Dask scripts, for real

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_hosts(pids: list[int]) -> set[str]:
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
    hosts = set()
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            hosts |= {c.laddr.ip for c in p.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN}
    return hosts


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dask_scripts_start_a_real_cluster(tmp_path: Path) -> None:
    """start-scheduler.sh + start-workers.sh --nworkers 2 + a fake GPU worker (--gpus 0, on a
    CPU machine) on 127.0.0.1; a client computes, GPU-annotated tasks land on the GPU worker
    only, nothing listens beyond loopback; stop.sh stops it all."""
    import dask
    from distributed import Client

    port, dash = _free_port(), _free_port()
    run_dir = tmp_path / "dask"
    env = {k: v for k, v in os.environ.items()
           if k not in (*BIND_ENV, "CUDA_VISIBLE_DEVICES")}
    env |= {"PYTHON": sys.executable, "FSS_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    address = f"tcp://127.0.0.1:{port}"

    def run(script: str, *args: str) -> str:
        out = subprocess.run(["bash", str(INFRA / "dask" / script), *args, "--run-dir",
                              str(run_dir)], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=150)
        assert out.returncode == 0, f"{script}: {out.stdout}{out.stderr}"
        return out.stdout

    try:
        started = run("start-scheduler.sh", "--background", "--port", str(port),
                      "--dashboard-address", f"127.0.0.1:{dash}", "--wait", "90")
        assert f"export FSS_DASK_ADDRESS={address}" in started
        run("start-workers.sh", address, "--nworkers", "2", "--memory-limit", "1GB",
            "--name", "t", "--background", "--wait", "120")
        run("start-workers.sh", address, "--gpus", "0", "--name", "t", "--background",
            "--wait", "120")
        pids = [int(p.read_text()) for p in run_dir.glob("*.pid")]
        assert len(pids) == 3
        assert _listening_hosts(pids) == {"127.0.0.1"}

        with Client(address, timeout=30) as client:
            client.wait_for_workers(3, timeout=60)
            workers = {w["name"]: w for w in client.scheduler_info()["workers"].values()}
            assert set(workers) == {"t-cpu-0", "t-cpu-1", "t-gpu0"}
            assert workers["t-gpu0"]["resources"] == {"GPU": 1}
            assert all(w["nthreads"] == 1 for w in workers.values())

            assert client.submit(sum, range(101)).result(timeout=60) == 5050
            # Only picklable-by-reference callables here: this test module is not importable on
            # the workers (the project is, which is why it must be installed there).
            gpu_address = next(a for a, w in client.scheduler_info()["workers"].items()
                               if w["name"] == "t-gpu0")
            with dask.annotate(resources={"GPU": 1}):
                futures = client.map(os.getenv, ["CUDA_VISIBLE_DEVICES"] * 6, pure=False)
                delayed = [dask.delayed(os.getenv, pure=True)("CUDA_VISIBLE_DEVICES", str(i))
                           for i in range(3)]
                assert dask.compute(*delayed) == ("0", "0", "0")
            assert client.gather(futures) == ["0"] * 6
            assert {a for f in futures for a in client.who_has([f])[f.key]} == {gpu_address}
    finally:
        stop = subprocess.run(["bash", str(INFRA / "dask" / "stop.sh"), "--run-dir",
                               str(run_dir)], env=env, capture_output=True, text=True,
                              timeout=120)
        for pidfile in run_dir.glob("*.pid"):  # only if stop.sh itself failed
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    assert stop.returncode == 0, stop.stderr
    assert not list(run_dir.glob("*.pid"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _listening_hosts(pids):
        time.sleep(0.5)
    assert not _listening_hosts(pids), "processes left behind"
