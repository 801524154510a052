"""The real CLI, the real models, a real SQLite MLflow store: what a user sees."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, default_sigint, mlflow_runs, run_cli

PLUGIN = '''
import time
from dataclasses import dataclass

from pipeline.contract import BaseStage, StageError, StageResult

@dataclass
class EchoConfig:
    message: str = "hello"
    fail: bool = False
    oom: str = ""  # cuda | cpu: fail as that device's allocator does
    sleep_s: float = 0.0
    api_key: str = ""

class Echo(BaseStage):
    """A third-party evaluate stage: reports the model class, or fails, or hangs a while."""
    name = "evaluate"
    Config = EchoConfig

    def apply(self, ctx):
        if self.cfg.fail:
            raise StageError("evaluate", "plugin asked to fail: " + self.cfg.message)
        if self.cfg.oom == "cuda":
            import torch
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        if self.cfg.oom == "cpu":  # torch's own words when a CPU allocation fails
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                               "memory: you tried to allocate 85899345920 bytes.")
        time.sleep(self.cfg.sleep_s)
        return StageResult(metrics={"echo_len": len(self.cfg.message)},
                           tags={"echo.model_class": type(ctx.model).__name__},
                           summary=self.cfg.message)
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A small installed-looking package that declares a stage through the entry-point group."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "echo_stage").mkdir()
    (root / "echo_stage" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    meta = root / "echo_stage-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-stage\nVersion: 0.1\n")
    (meta / "entry_points.txt").write_text("[optipipe.stages]\necho = echo_stage:Echo\n")
    return root


def plugin_env(plugin_path: Path) -> dict:
    return {"PYTHONPATH": f"{ROOT}:{plugin_path}"}


def test_default_job_on_real_smollm2(tmp_path):
    """The README's first command: real model, sensible text, metrics and artifacts in the store."""
    start = time.perf_counter()
    proc = run_cli("generate.repeats=2", cwd=tmp_path, check=0)
    assert "FINISHED" in proc.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/outputs/mlflow.db" in proc.stdout
    client, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    for name in ("load/seconds", "load/parameters", "load/weight_bytes", "generate/ttft_ms_p50",
                 "generate/ttft_ms_p90", "generate/itl_ms_p50", "generate/itl_ms_p90",
                 "generate/decode_tokens_per_s", "generate/e2e_tokens_per_s", "generate/memory_peak_rss_gib"):
        assert run.data.metrics[name] > 0, name
    assert 130e6 < run.data.metrics["load/parameters"] < 140e6
    assert run.data.tags["choice.quantize"] == "none" and run.data.tags["convert.attn_implementation"] == "sdpa"
    assert run.data.params["generate.batch_size"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"resolved_config.yaml", "overrides.yaml", "environment.json", "generate_samples.jsonl"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "generate_samples.jsonl", str(tmp_path)))
    first = json.loads(local.read_text().splitlines()[0])
    assert first["prompt"] == "What is the capital of France?" and "Paris" in first["output"]
    env = json.loads(Path(client.download_artifacts(run.info.run_id, "environment.json", str(tmp_path))).read_text())
    assert env["packages"]["torch"] and "gpus" in env
    assert time.perf_counter() - start < 120  # the bar is 60 s once cached; leave room for a loaded CI


def test_multirun_is_one_parent_with_a_child_per_job(tmp_path):
    run_cli("-m", *TINY, "generate.batch_size=1,2", cwd=tmp_path, check=0)
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert sorted(r.data.params["generate.batch_size"] for r in children) == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parents[0].data.tags["optipipe.jobs"] == "2"


def test_plugin_stage_from_entry_point(tmp_path, plugin_path):
    proc = run_cli(*TINY, "evaluate._target_=echo_stage.Echo", "+evaluate.message=plugged-in",
                   cwd=tmp_path, env=plugin_env(plugin_path), check=0)
    assert "plugged-in" in proc.stdout
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert runs[0].data.tags["echo.model_class"] == "LlamaForCausalLM"
    assert runs[0].data.metrics["evaluate/echo_len"] == len("plugged-in")


def test_failing_stage_marks_the_run_failed_with_its_message(tmp_path, plugin_path):
    proc = run_cli(*TINY, "evaluate._target_=echo_stage.Echo", "+evaluate.fail=true",
                   "+evaluate.message=boom", cwd=tmp_path, env=plugin_env(plugin_path), check=1)
    assert "plugin asked to fail: boom" in proc.stderr + proc.stdout
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert runs[0].info.status == "FAILED"
    assert "plugin asked to fail: boom" in runs[0].data.tags["optipipe.error"]
    assert "generate/decode_tokens_per_s" in runs[0].data.metrics  # stages before it were logged


def interrupt_once(tmp_path: Path, plugin_path: Path, args: list[str], samples_glob: str,
                   sig: int = signal.SIGINT) -> int:
    """Start the CLI with a stage that sleeps, press Ctrl-C once generate has written its samples
    (the run exists by then; reading the store earlier would race its creation), return the exit code."""
    env = {**os.environ, **plugin_env(plugin_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "evaluate._target_=echo_stage.Echo",
                             "+evaluate.sleep_s=60"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)
    deadline = time.time() + 90
    while time.time() < deadline and not list(tmp_path.glob(samples_glob)):
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(sig)
    return proc.wait(timeout=60)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_marks_the_run_killed(tmp_path, plugin_path, sig, code):
    assert interrupt_once(tmp_path, plugin_path, [*TINY], "outputs/runs/*/*/generate_samples.jsonl", sig) == code
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert runs[0].info.status == "KILLED"
    why = "terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted (Ctrl-C)"
    assert runs[0].data.tags["optipipe.error"] == why


@pytest.mark.slow
def test_a_run_left_running_by_sigkill_is_marked_killed_by_report_repair(tmp_path, plugin_path):
    store = tmp_path / "outputs" / "mlflow.db"
    assert interrupt_once(tmp_path, plugin_path, [*TINY], "outputs/runs/*/*/generate_samples.jsonl",
                          signal.SIGKILL) == -signal.SIGKILL
    _, runs = mlflow_runs(store)
    assert [r.info.status for r in runs] == ["RUNNING"]  # nothing could close it
    repaired = run_cli("report", "--repair", "--uri", f"sqlite:///{store}", cwd=tmp_path, check=0)
    assert "1 run(s) left RUNNING by a killed process marked KILLED" in repaired.stdout
    _, runs = mlflow_runs(store)
    assert runs[0].info.status == "KILLED" and "SIGKILL" in runs[0].data.tags["optipipe.killed_why"]


def test_the_next_run_marks_runs_of_dead_processes_killed_and_leaves_live_ones(tmp_path):
    """Runs whose recorded process is gone (or now another program) become KILLED when a new run
    starts on the store; a run whose process still runs stays RUNNING."""
    import socket

    from pipeline.config import TrackerSettings
    from pipeline.tracking import JobInfo, MlflowTracker

    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "optipipe"])
    try:
        tracker = MlflowTracker(TrackerSettings(uri=f"sqlite:///{tmp_path}/m.db"))
        host = socket.gethostname()
        exp = tracker.client.create_experiment("optipipe")
        ids = {name: tracker.client.create_run(exp, tags={"host": host, "optipipe.pid": str(pid)}).info.run_id
               for name, pid in (("dead", dead.pid), ("live", live.pid), ("other_host", dead.pid))}
        tracker.client.set_tag(ids["other_host"], "host", "elsewhere")
        tracker.start(JobInfo(run_name="next", params={}, tags={}))
        status = {name: tracker.client.get_run(i).info.status for name, i in ids.items()}
        assert status == {"dead": "KILLED", "live": "RUNNING", "other_host": "RUNNING"}
        assert "marked by run " + tracker.run_id in tracker.client.get_run(ids["dead"]).data.tags["optipipe.killed_why"]
    finally:
        live.kill()


def test_a_second_ctrl_c_while_the_run_closes_does_not_stop_the_closing():
    from pipeline.runner import finish_run

    closed = []

    class Tracker:
        def finish(self, status, error=None):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, right as the run is being closed
            time.sleep(0.2)  # it would be delivered here, if it were not held
            closed.append(status)

    finish_run(Tracker(), "KILLED", "interrupted (Ctrl-C)")
    assert closed == ["KILLED"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again after


def test_ctrl_c_while_the_run_is_being_created_still_ends_it_killed(tmp_path):
    from pipeline.runner import execute, make_plan
    from pipeline.validate import resolve
    from tests.conftest import composed

    calls = []

    class Tracker:
        run_id, lost, where = None, None, ""

        def start(self, job):
            calls.append("created")
            raise KeyboardInterrupt  # right after the store made the run

        def log_result(self, stage, result):
            calls.append(stage)

        def finish(self, status, error=None):
            calls.append(status)

    resolved = resolve(composed("model=tiny_random", "tracker=none"))
    with pytest.raises(KeyboardInterrupt):
        execute(resolved, make_plan(resolved), tmp_path, Tracker(), job=None)
    assert calls == ["created", "KILLED"]


def test_tracker_none_never_imports_mlflow(tmp_path):
    code = ("import sys; sys.argv = ['optipipe', 'tracker=none', " + ", ".join(repr(a) for a in TINY) + "]\n"
            "from pipeline.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('MLFLOW_IMPORTED', 'mlflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert "MLFLOW_IMPORTED False" in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


def test_secrets_never_reach_the_store(tmp_path):
    run_cli(*TINY, "+model.hf_token=hf_SECRET123", "model=tiny_random", cwd=tmp_path, check=2)
    # model keys are typed, so an unknown key is refused; a plugin key is the realistic way in:
    from pipeline.config import flatten
    from pipeline.redact import redact_overrides

    assert "x.hf_token" not in flatten({"x": {"hf_token": "hf_SECRET123", "max_new_tokens": 3}})
    assert redact_overrides(["+evaluate.api_key=abc", "generate.max_new_tokens=4"]) == \
        ["+evaluate.api_key=***", "generate.max_new_tokens=4"]


@pytest.mark.parametrize("text,secret", [
    ("token hf_abcdefghijklmnopqrstuv in a prompt", "hf_abcdefghijklmnopqrstuv"),
    ("key sk-proj-ABCDEFGHIJKLMNOPQRST", "sk-proj-ABCDEFGHIJKLMNOPQRST"),
    ("aws AKIAABCDEFGHIJKLMNOP here", "AKIAABCDEFGHIJKLMNOP"),
    ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("tracker.uri=https://alice:s3cretpw@mlflow.example:5000", "s3cretpw"),
    ("+plugin.db_password=open-sesame", "open-sesame"),
])
def test_redaction_masks_credentials_by_shape_key_and_uri(text, secret):
    from pipeline.redact import redact, redact_text

    assert secret not in redact_text(text) and "***" in redact_text(text)
    assert secret not in str(redact({"a": [text], "b": {"x": text}}))
    kept = "generate.max_new_tokens=4 pad_token=0 model.id=HuggingFaceTB/SmolLM2-135M"
    assert redact_text(kept) == kept  # counts, tokenizer words and model ids are not secrets


def test_no_secret_reaches_any_file_or_the_console(tmp_path, plugin_path):
    """Secrets by key, by shape (hf_…), inside a URI and interpolated from the environment: none
    reaches the store, the run and sweep folders, run names or the console."""
    secrets = ["plainkeyvalue99", "hf_abcdefghijklmnopqrstu", "hunter2pw", "envsecretvalue42"]
    proc = run_cli("-m", *TINY, "generate.batch_size=1,2", "evaluate._target_=echo_stage.Echo",
                   f"+evaluate.api_key={secrets[0]}",
                   f"+evaluate.message='{secrets[1]} http://bob:{secrets[2]}@db.example/x ${{oc.env:MY_SERVICE_TOKEN}}'",
                   cwd=tmp_path, env={**plugin_env(plugin_path), "MY_SERVICE_TOKEN": secrets[3]}, check=0)
    seen = {"console": proc.stdout + proc.stderr}
    for path in (tmp_path / "outputs").rglob("*"):
        if path.is_file():
            seen[str(path.relative_to(tmp_path))] = path.read_bytes().decode("utf-8", "replace")
    assert any(name.endswith("mlflow.db") for name in seen) and any(name.endswith("multirun.yaml") for name in seen)
    leaks = [(name, s) for name, text in seen.items() for s in secrets if s in text]
    assert not leaks, leaks
    assert "***" in seen["console"] and "http://bob:***@db.example" in "".join(seen.values())
    assert not list(tmp_path.glob("outputs/**/.hydra"))  # Hydra's copy of the config as typed is not written
    # Hydra's own error for a mistyped key echoes the override: masked on the way out too
    typo = run_cli(*TINY, "tracker=none", f"evaluate.nokey={secrets[1]}", cwd=tmp_path, check=2)
    assert "evaluate.nokey" in typo.stderr and secrets[1] not in typo.stdout + typo.stderr


def test_two_jobs_started_together_never_share_a_run_folder(tmp_path):
    common = [sys.executable, "-m", "pipeline", *TINY, "model=tiny_random", "tracker=none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([*common, f"generate.seed={i}"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    folders = sorted(tmp_path.glob("outputs/runs/*/*"))
    assert len(folders) == 2
    # <time>_<short hash of the overrides>_<pid>: different commands, different hashes
    names = [re.fullmatch(r"\d\d-\d\d-\d\d_([0-9a-f]{8})_(\d+)", f.name) for f in folders]
    assert all(names) and names[0][1] != names[1][1], [f.name for f in folders]
    assert {"generate.seed=0", "generate.seed=1"} == {
        next(line.strip("- ") for line in (f / "overrides.yaml").read_text().splitlines() if "seed" in line)
        for f in folders}


def test_out_of_memory_job_fails_with_advice_and_the_sweep_goes_on(tmp_path, plugin_path):
    proc = run_cli("-m", *TINY, "evaluate._target_=echo_stage.Echo", "+evaluate.oom=cuda,cpu,none",
                   cwd=tmp_path, env=plugin_env(plugin_path), check=1)
    assert "best: optipipe" in proc.stdout
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    jobs = {r.data.params["evaluate.oom"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert jobs["none"].info.status == "FINISHED"
    for device in ("cuda", "cpu"):  # the same advice whichever allocator gave up
        assert jobs[device].info.status == "FAILED"
        assert "out of memory" in jobs[device].data.tags["optipipe.error"]
        assert "generate.batch_size" in jobs[device].data.tags["optipipe.error"]


@pytest.mark.parametrize("sig,expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_in_a_sweep_kills_the_job_and_the_sweep(tmp_path, plugin_path, sig, expected):
    code = interrupt_once(tmp_path, plugin_path, ["-m", *TINY, "generate.batch_size=1,2"],
                          "outputs/multirun/*/*/0/generate_samples.jsonl", sig)
    assert code == expected
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]  # the job and its parent; job 2 never began


def test_one_new_token_reports_decode_as_not_applicable(tmp_path):
    """No decode step: neither the console nor the store shows a NaN rate."""
    proc = run_cli("model=tiny_random", "generate.max_new_tokens=1", "generate.warmup=0", "generate.repeats=2",
                   "load.num_threads=1", cwd=tmp_path, check=0)
    assert "decode n/a (1 new token)" in proc.stdout and "nan" not in proc.stdout.lower()
    assert "CPU threads: 1" in proc.stdout
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    run = runs[0]
    assert "generate/decode_tokens_per_s" not in run.data.metrics
    assert not [k for k, v in run.data.metrics.items() if v != v]  # no NaN anywhere
    assert run.data.tags["generate.decode"].startswith("not applicable")
    assert run.data.params["load.num_threads"] == "1"


CHATTER = ("Failed to load", "Detected no triton", "Enum subclass", "Loading weights", "USDT", "profiler_start")


def test_third_party_chatter_stays_off_the_console_unless_verbose(tmp_path):
    """torchao's kernel-library and triton notes, torch's deprecation notes, transformers' loading
    bar and the profiler library's lines (the attention check runs the profiler) only with
    pipeline.verbose=true."""
    job = ("model=tiny_random", "quantize=int8_torchao", "convert=sdpa", "generate.max_new_tokens=4",
           "generate.warmup=0", "generate.repeats=1", "tracker=none")
    quiet = run_cli(*job, cwd=tmp_path, check=0)
    assert "FINISHED" in quiet.stdout
    assert not [c for c in CHATTER if c in quiet.stdout + quiet.stderr], quiet.stderr[-2000:]
    loud = run_cli(*job, "pipeline.verbose=true", cwd=tmp_path, check=0)
    assert "Loading weights" in loud.stderr and "FINISHED" in loud.stdout


def test_one_bad_sweep_point_stops_the_sweep_before_any_job(tmp_path):
    proc = run_cli("-m", *TINY, "generate.batch_size=1,0,2", cwd=tmp_path, check=2)
    assert "generate.batch_size: must be ≥ 1, got 0 (sweep point: generate.batch_size=0)" in proc.stderr
    assert "none was run" in proc.stderr and "optipipe run" not in proc.stdout
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # no parent run, no job run
    assert not list(tmp_path.glob("outputs/multirun/*/*/*"))


def test_sweep_points_are_the_basic_sweepers_product():
    from pipeline.sweep import sweep_points

    points = sweep_points(["quantize=none,nf4", "generate.batch_size=range(1,4)", "model=tiny_random",
                           "hydra/launcher=joblib"])
    assert len(points) == 6 and ["quantize=nf4", "generate.batch_size=3", "model=tiny_random"] in points
    assert sweep_points(["generate.batch_size=int(interval(1, 8))"]) is None  # a search sweeper's space


def test_the_guard_composes_a_sweeps_first_point():
    """What hydra_guard checks before Hydra starts: the first value of each list, a search's
    intervals left to the sweeper, hydra.* settings kept (the sweep's own points drop them)."""
    from pipeline.hydra_guard import _one_point

    assert _one_point(["quantize=nf4,none", "generate.top_k=int(interval(1, 8))", "model=tiny_random",
                       "hydra.sweeper.n_trials=3"]) == ["quantize=nf4", "model=tiny_random", "hydra.sweeper.n_trials=3"]


def test_every_run_leaves_its_numbers_in_the_run_dir(tmp_path):
    """metrics.json beside the config: untracked runs keep their results; tracked ones name the run."""
    for tracker in ("none", "mlflow"):
        run_cli(*TINY, f"tracker={tracker}", f"hydra.run.dir={tmp_path}/{tracker}", cwd=tmp_path, check=0)
        data = json.loads((tmp_path / tracker / "metrics.json").read_text())
        assert data["status"] == "FINISHED" and data["metrics"]["generate/decode_tokens_per_s"] > 0
        assert data["metrics"]["load/parameters"] > 0 and data["tags"]["model.source"] == "random"
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert json.loads((tmp_path / "none" / "metrics.json").read_text())["mlflow_run_id"] is None
    assert json.loads((tmp_path / "mlflow" / "metrics.json").read_text())["mlflow_run_id"] == runs[0].info.run_id


def test_help_says_what_the_cli_can_do(tmp_path):
    out = run_cli("--help", cwd=tmp_path, check=0).stdout
    assert "optipipe bench --help" in out and "optipipe report --help" in out and "pipeline.dry_run=true" in out
    assert "generate: default, encode, fast, none" in out and "shard: data_parallel" in out
    assert "optipipe -sc install=bash" in out
