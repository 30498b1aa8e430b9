"""The UIs for real, in headless Chromium (Selenium + the distribution's chromedriver; no browser
download): `fss ui` (`mlflow server` on 127.0.0.1) on a tiny ablation in SQLite, its runs, the
parent's summary and the registered model's alias; and a Prefect server's flow-run page of an
`fss ablate` run, with its logs and named task runs."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.cli.services import add_ui_parser
from flows.deployments import ablation_deployment
from flows.runtime import prefect_api, stop_process
from flows.ui import start_mlflow_ui

CHROMIUM = Path(os.environ.get("FSS_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("FSS_CHROMEDRIVER", "/usr/bin/chromedriver"))
STUDY, EXPERIMENT = "ui-tiny", "ui-ablation"
# Chromium in a container, as root, offline: no sandbox, GPU, QUIC or background fetches.
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-dev-shm-usage", "--window-size=1600,1000"]


def _browser_missing() -> str | None:
    """Why the browser test cannot run here, or None (checked at collection: a skip is free)."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        return (f"no headless browser: {', '.join(missing)} missing "
                "(apt-get install chromium chromium-driver)")
    return None


BROWSER_MISSING = _browser_missing()


def _study(store: str, out: Path) -> dict:
    return {
        "study": STUDY, "experiment": EXPERIMENT,
        "base": {"store": store, "dataset": "synth", "fold": 0, "steps": 2, "batch_size": 2,
                 "checkpoint_every": 2, "val_every": 2, "val_episodes": 2, "test_episodes": 4,
                 "test_shots": [1], "min_pixels": 64, "out_dir": str(out / "runs"),
                 "model_args": {"embed_dim": 16, "global_dim": 32, "local_dim": 16}},
        "grid": {"model": ["metasegnet"], "budget": [0.5, 1.0], "seed": [0]},
    }


def _api(url: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


@contextlib.contextmanager
def _chromium(tmp_path: Path, name: str, server_log: Path) -> Iterator[tuple[Any, Any, Any]]:
    """A headless Chromium, its 90 s wait and the page's text; on a failure, a screenshot
    `<name>-failure.png` and the server's log tail."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in [*CHROME_ARGS, f"--user-data-dir={tmp_path / f'{name}-profile'}"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)

    def body() -> str:
        return driver.find_element(By.TAG_NAME, "body").text

    try:
        yield driver, WebDriverWait(driver, 90), body
    except Exception:
        driver.save_screenshot(str(tmp_path / f"{name}-failure.png"))
        print(server_log.read_text()[-4000:])
        raise
    finally:
        driver.quit()


def test_ui_parser_and_busy_port(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    add_ui_parser(p.add_subparsers())
    assert p.parse_args(["ui"]).port == 5000
    assert p.parse_args(["ui", "--port", "0"]).port == 0
    with socket.socket() as s:  # a port that is taken: a clear message, no server started
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ValueError, match="in use"):
            start_mlflow_ui(f"sqlite:///{tmp_path / 'm.db'}", s.getsockname()[1])
    with pytest.raises(ValueError, match="tracking server"):
        start_mlflow_ui("http://127.0.0.1:5000", 0)


@pytest.mark.slow
@pytest.mark.skipif(BROWSER_MISSING is not None, reason=BROWSER_MISSING or "")
def test_ablation_parent_and_children_in_the_mlflow_ui(
        tiny_store: str, tmp_path: Path, prefect_api_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.webdriver.common.by import By

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # mlartifacts/ of tasks.study.tracking lands here
    study = tmp_path / "ablation-ui.yaml"
    study.write_text(yaml.safe_dump(_study(tiny_store, tmp_path)))
    with prefect_api():  # the nightly deployment's entrypoint: a study file, run_ablation
        out = ablation_deployment(config_path=str(study), out_dir=str(tmp_path / "reports"))
    assert out["trained"] == 2 and not out["failed"]
    parent_id = out["parent_run_id"]

    proc, url = start_mlflow_ui(uri, 0, log=tmp_path / "mlflow-ui.log")
    try:
        # The server's REST API first: what the page must show.
        name = urllib.parse.quote(EXPERIMENT)
        exp = _api(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")
        exp_id = exp["experiment"]["experiment_id"]
        runs = _api(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})
        children = sorted(r["info"]["run_name"] for r in runs["runs"]
                          if r["info"]["run_id"] != parent_id)
        assert len(children) == 2 and all(c.startswith("metasegnet ") for c in children)

        with _chromium(tmp_path, "mlflow-ui", tmp_path / "mlflow-ui.log") as (driver, wait, body):
            # MLflow 3 opens experiments in its GenAI view: ask for the model-training one.
            driver.get(f"{url}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
            wait.until(lambda _: f"ablation {STUDY}" in body())
            # Child runs are folded under their parent: unfold it with the row's expander button.
            row = driver.find_element(By.CSS_SELECTOR, f"div[role=row][row-id='{parent_id}']")
            row.find_elements(By.TAG_NAME, "button")[0].click()
            wait.until(lambda _: all(c in body() for c in children))
            shot = tmp_path / "mlflow-ui-runs.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
            text = body()
            assert f"ablation {STUDY}" in text and "3 matching runs" in text

            # The parent's summary artifacts come from the same mlartifacts folder.
            driver.get(f"{url}/#/experiments/{exp_id}/runs/{parent_id}/artifacts"
                       "?workflowType=machine_learning")
            wait.until(lambda _: "summary" in body())
            driver.find_element(By.XPATH, "//*[normalize-space(text())='summary']").click()
            wait.until(lambda _: "miou_vs_budget.png" in body() and "report.html" in body())
            big_images = ("return [...document.images].filter(i => i.complete && "
                          "i.naturalWidth > 300 && i.naturalHeight > 200).length")
            before = driver.execute_script(big_images)
            plot = "//*[normalize-space(text())='miou_vs_budget.png']"
            driver.find_element(By.XPATH, plot).click()
            # The preview is the plot itself (a blob: URL), which the server read from the file://
            # artifact folder.
            wait.until(lambda _: driver.execute_script(big_images) > before)
            driver.save_screenshot(str(tmp_path / "mlflow-ui-artifacts.png"))

            # The registry: the study's model, its alias (the study) pointing at version 1.
            model = "fss-metasegnet"
            by_alias = _api(f"{url}/api/2.0/mlflow/registered-models/alias?"
                            + urllib.parse.urlencode({"name": model, "alias": STUDY}))
            assert by_alias["model_version"]["version"] == "1"
            driver.get(f"{url}/#/models/{model}")
            wait.until(lambda _: model in body() and STUDY in body() and "Version 1" in body())
            shot = tmp_path / "mlflow-ui-model.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        stop_process(proc)


@pytest.mark.slow
@pytest.mark.skipif(BROWSER_MISSING is not None, reason=BROWSER_MISSING or "")
def test_prefect_flow_run_page_shows_logs_and_named_task_runs(
        tiny_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fss ablate` against a Prefect server with its UI (the default one, v2): the flow run's
    page shows the run's own log lines and, on its Task Runs tab, one task per point named by
    what it does."""
    from flows.runtime import start_server

    study_name = "ui-flow"
    monkeypatch.setenv("FSS_HOME", str(tmp_path / "fss-home"))  # this server's own DB
    proc, api = start_server(ui=True, log=tmp_path / "prefect-ui.log")
    base = api.removesuffix("/api")
    try:
        study = tmp_path / "ablation-flow.yaml"
        study.write_text(yaml.safe_dump(_study(tiny_store, tmp_path) | {"study": study_name}))
        # The CLI as a user runs it: its logging settings, not this test process's.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
        env |= {"PREFECT_API_URL": api, "OMP_NUM_THREADS": "1",
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        done = subprocess.run([sys.executable, "-m", "flows.cli", "ablate", "--config",
                               str(study), "--out", str(tmp_path / "reports")],
                              cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

        # The server's REST API first: what the page must show.
        (run,) = _api(f"{api}/flow_runs/filter",
                      {"flow_runs": {"name": {"any_": [f"ablation {study_name}"]}}})
        tasks = _api(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        names = sorted(t["name"] for t in tasks)
        assert names == ["train metasegnet 100% seed 0", "train metasegnet 50% seed 0"]
        logs = [log["message"] for log in _api(
            f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}})]
        started = next(m for m in logs if m.startswith(f"study {study_name}: 2 points"))

        with _chromium(tmp_path, "prefect-ui", tmp_path / "prefect-ui.log") as (driver, wait, body):
            # The Logs tab opens first; the line our flow logged when it started is there.
            driver.get(f"{base}/v2/runs/flow-run/{run['id']}")
            wait.until(lambda _: f"ablation {study_name}" in body() and started in body())
            shot = tmp_path / "prefect-ui-logs.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
            assert "didn't generate logs" not in body()

            driver.get(f"{base}/v2/runs/flow-run/{run['id']}?tab=TaskRuns")
            wait.until(lambda _: all(n in body() for n in names))
            shot = tmp_path / "prefect-ui-task-runs.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        stop_process(proc)
