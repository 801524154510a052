"""Shared test helpers: compose configs in-process, run the real CLI, build tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import compose

ROOT = Path(__file__).resolve().parents[1]


def composed(*overrides: str):
    """The config exactly as the CLI would compose it (no Hydra runtime needed)."""
    return compose(list(overrides))


OUTSIDE_OUTPUTS = "pipeline.allow_outside_outputs=true"


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300,
            check: int | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline`` as a user would; ``check`` asserts the exit code."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    if any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args):
        args = (*args, OUTSIDE_OUTPUTS)  # tests keep their folders in tmp_path, beside ./outputs
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    return proc


def default_sigint() -> None:
    """preexec_fn for a process that a test interrupts: a shell that starts the test run in the
    background (no job control) hands every child SIGINT ignored, and Python then never raises
    KeyboardInterrupt; restore the terminal's default so the process sees Ctrl-C as a user would."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def mlflow_runs(store: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    exps = client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in exps]) if exps else []


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama with a byte tokenizer: a local model directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from stages.load.presets import preset_config
    from stages.load.tokenizer import byte_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = preset_config("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer("llama", config.vocab_size).save_pretrained(path)
    return path


TINY = ("model=tiny_random", "generate.max_new_tokens=4", "generate.warmup=0", "generate.repeats=1")


def generate_in_process(folder: Path, *overrides: str) -> Path:
    """One job's stages, load to generate, run in this process as the runner runs them (no CLI
    start-up, no tracking): ``folder`` gets the job's samples. For comparisons with a CLI run."""
    from pipeline.contract import STAGE_ORDER
    from pipeline.runner import make_plan, open_context
    from pipeline.validate import resolve

    folder.mkdir(parents=True, exist_ok=True)
    resolved = resolve(composed("tracker=none", *overrides))
    ctx = open_context(resolved, make_plan(resolved), folder)
    for name in STAGE_ORDER[:STAGE_ORDER.index("generate") + 1]:
        resolved.stages[name].apply(ctx)
    return folder
