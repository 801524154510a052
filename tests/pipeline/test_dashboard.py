"""Real parts: a real `mlflow server` on 127.0.0.1, and parallel jobs writing one SQLite store."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import OUTSIDE_OUTPUTS, ROOT, TINY, mlflow_runs, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.5)
    stop_server(proc)
    pytest.fail("mlflow server did not start within 90 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    proc, url = start_server(tmp_path)
    try:
        yield url
    finally:
        stop_server(proc)


SLEEPY = """
import time
from dataclasses import dataclass

from pipeline.contract import BaseStage, StageResult

@dataclass
class SleepyConfig:
    sleep_s: float = 0.0

class Sleepy(BaseStage):
    name = "evaluate"
    Config = SleepyConfig

    def apply(self, ctx):
        time.sleep(self.cfg.sleep_s)
        return StageResult(metrics={"slept_s": self.cfg.sleep_s})
"""


@pytest.mark.slow
def test_a_server_that_dies_mid_run_costs_seconds_and_keeps_the_results(tmp_path):
    """Tracking calls give up within seconds (not MLflow's minutes of retries), the run goes on,
    its results land in metrics.json, and the exit code says it was not tracked."""
    import json

    (tmp_path / "sleepy.py").write_text(SLEEPY)
    proc, url = start_server(tmp_path)
    run_dir = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "pipeline", *TINY, f"tracker.uri={url}", "tracker.connect_timeout_s=2",
                            "evaluate._target_=sleepy.Sleepy", "+evaluate.sleep_s=5", "pipeline.allow=[sleepy]",
                            f"hydra.run.dir={run_dir}", OUTSIDE_OUTPUTS], cwd=tmp_path, text=True,
                           env={**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", "HF_HUB_OFFLINE": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / "generate_samples.jsonl").exists():
            time.sleep(0.3)
        stop_server(proc)  # the run exists and generate is logged; evaluate is asleep
        killed_at = time.time()
        out, err = job.communicate(timeout=120)
    finally:
        job.kill()
        stop_server(proc)
    assert job.returncode == 1, out + err
    assert time.time() - killed_at < 60  # the 5 s sleep, then seconds of failing calls
    assert "tracking failed mid-run" in err
    results = json.loads((run_dir / "metrics.json").read_text())
    assert results["status"] == "FINISHED" and results["tracking_error"]
    assert results["metrics"]["evaluate/slept_s"] == 5 and results["metrics"]["generate/decode_tokens_per_s"] > 0


def api(url: str, endpoint: str, **params):
    response = requests.get(f"{url}/api/2.0/mlflow/{endpoint}", params=params, timeout=10)
    response.raise_for_status()
    return response.json()


def test_sweep_against_a_real_server_nests_and_logs_everything(tmp_path, mlflow_server):
    run_cli("-m", *TINY, "generate.batch_size=1,2", f"tracker.uri={mlflow_server}", cwd=tmp_path, check=0)
    exp = api(mlflow_server, "experiments/get-by-name", experiment_name="optipipe")["experiment"]
    runs = requests.post(f"{mlflow_server}/api/2.0/mlflow/runs/search",
                         json={"experiment_ids": [exp["experiment_id"]]}, timeout=10).json()["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parent = next(r for r, t in zip(runs, tags) if t.get("optipipe.sweep") == "true")
    children = [r for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent["info"]["run_id"]]
    assert len(children) == 2
    for child in children:
        metrics = {m["key"] for m in child["data"]["metrics"]}
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        assert "generate/decode_tokens_per_s" in metrics and params["model.id"] == "tiny-llama"
        files = {f["path"] for f in api(mlflow_server, "artifacts/list", run_id=child["info"]["run_id"])["files"]}
        assert {"environment.json", "generate_samples.jsonl", "resolved_config.yaml"} <= files
    report = api(mlflow_server, "artifacts/list", run_id=parent["info"]["run_id"], path="report")["files"]
    assert {"report/summary.csv", "report/throughput_vs_memory.png"} <= {f["path"] for f in report}


@pytest.mark.slow
def test_four_parallel_jobs_lose_nothing_in_one_sqlite_store(tmp_path):
    run_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", *TINY, "generate.batch_size=1,2,3,4",
            cwd=tmp_path, check=0)
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    counts = {len(r.data.metrics) for r in children}
    assert len(counts) == 1 and counts.pop() > 20  # every job logged every metric
    assert sorted(r.data.params["generate.batch_size"] for r in children) == ["1", "2", "3", "4"]
    # the report's command repeats how the jobs ran, not only what they varied
    from pipeline import report
    from pipeline.tracking import _client

    parent = next(r for r in runs if r.data.tags.get("optipipe.sweep") == "true")
    command = report.heading(_client(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"), parent.info.run_id)
    assert command.startswith("`optipipe -m hydra/launcher=joblib hydra.launcher.n_jobs=4 model=")


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=20000", "--window-size=1400,900"]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")
def test_experiment_page_renders_the_sweep_in_headless_chromium(tmp_path, mlflow_server):
    run_cli("-m", *TINY, "generate.batch_size=1,2", f"tracker.uri={mlflow_server}", cwd=tmp_path, check=0)
    exp = api(mlflow_server, "experiments/get-by-name", experiment_name="optipipe")["experiment"]
    page = f"{mlflow_server}/#/experiments/{exp['experiment_id']}/runs"
    shot = Path(__file__).resolve().parents[2] / "outputs" / "test-artifacts" / "mlflow_runs_page.png"
    shot.parent.mkdir(parents=True, exist_ok=True)

    def chromium(*args: str) -> str:
        return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, page],
                              capture_output=True, text=True, timeout=120).stdout

    for _ in range(3):  # the first load of the UI's scripts can outlast the virtual-time budget
        dom = chromium("--dump-dom")
        if "matching runs" in dom:
            break
    text = re.sub(r"<[^>]+>", "", dom)  # the page as read: "<strong>3</strong> matching runs"
    assert "3 matching runs" in text  # the parent and its two jobs
    assert "sweep model=tiny_r" in text  # the parent run's name, as the UI lists it
    chromium(f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_submitit_local_launcher_nests_jobs_under_the_sweep(tmp_path):
    run_cli("-m", "hydra/launcher=submitit_local", *TINY, "generate.batch_size=1,2", cwd=tmp_path, check=0)
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    parent = next(r for r in runs if r.data.tags.get("optipipe.sweep") == "true")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)


def test_slurm_preset_composes():
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module="conf"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == 1 and "SlurmLauncher" in cfg.hydra.launcher._target_


def test_the_dashboard_command_stays_on_one_line_in_a_narrow_terminal(monkeypatch):
    import io

    from rich.console import Console

    from pipeline import console
    from pipeline.runner import RunOutcome

    narrow = Console(width=40, file=io.StringIO(), highlight=False)
    monkeypatch.setattr(console, "out", narrow)
    where = "mlflow ui --backend-store-uri sqlite:////a/rather/long/path/to/outputs/mlflow.db"
    console.print_summary(RunOutcome(), where, None)
    assert f"dashboard: {where}\n" in narrow.file.getvalue()  # copied as one command, not cut at 40 columns
