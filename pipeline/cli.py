"""The ``optipipe`` command: Hydra composes, we validate, run and report. Nothing else lives here.

Exit codes: 0 done, 1 a stage failed (run marked FAILED), 2 a configuration problem (nothing
loaded, nothing written to the store), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from pipeline import console, launch, quiet, stopping, sweep
from pipeline.config import flatten
from pipeline.hydra_guard import problems_before_hydra
from pipeline.redact import redact, redact_console, redact_overrides
from pipeline.contract import ConfigProblems, Problem, StageError
from pipeline.runner import execute, make_plan, write_results
from pipeline.tracking import PARENT_ENV, RESUME_KEYS, JobInfo, make_tracker
from pipeline.resolved import Resolved
from pipeline.validate import resolve

EXIT_FAILED, EXIT_CONFIG = 1, 2
_state = {"job_started": False}


class JobFailed(RuntimeError):
    """Raised inside a sweep so Hydra records the job as failed and runs the next one."""


def _redacted_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(redact(OmegaConf.to_container(cfg, resolve=True)))


def config_hash(cfg: DictConfig) -> str:
    """Identity of a job: its resolved configuration (``pipeline.resume`` itself left out) and the
    environment it measures in (versions, commit, cards)."""
    from pipeline.environment import fingerprint

    data = OmegaConf.to_container(cfg, resolve=True)
    for key in RESUME_KEYS:
        data.get("pipeline", {}).pop(key, None)
    data["_environment"] = fingerprint()
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]


def job_info(cfg: DictConfig, resolved: Resolved, output_dir: Path) -> JobInfo:
    """Params, tags and artifacts of this job, read from Hydra's runtime."""
    from pipeline.environment import describe

    hc = HydraConfig.get()
    overrides = redact_overrides(list(hc.overrides.task))
    env = describe()
    (output_dir / "resolved_config.yaml").write_text(_redacted_yaml(cfg))
    (output_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    (output_dir / "environment.json").write_text(json.dumps(env, indent=2))
    choices = {g: str(o) for g, o in hc.runtime.choices.items() if not g.startswith("hydra")}
    tags = {f"choice.{g}": o for g, o in choices.items()}
    tags.update({"git.commit": env["git_commit"] or "unknown", "host": socket.gethostname(),
                 "world_size": str(resolved.launcher.processes), "optipipe.output_dir": str(output_dir),
                 "model.id": resolved.model.id, "optipipe.overrides": " ".join(overrides)[:5000],
                 "optipipe.config_hash": config_hash(cfg),
                 # what a report heading needs to say where its numbers come from
                 "cards": " + ".join(g["name"] for g in env["gpus"]) or f"CPU ({env['cpu_count']} cores)",
                 "versions": ", ".join(f"{n} {env['packages'].get(n)}" for n in ("torch", "transformers"))})
    if resolved.warnings:
        tags["optipipe.warnings"] = " | ".join(f"{w.key}: {w.message}" for w in resolved.warnings)
    name = resolved.tracker.run_name or (" ".join(overrides) if overrides else "default job")
    return JobInfo(run_name=name[:250], params=flatten(cfg), tags=tags,
                   artifacts=[output_dir / n for n in ("resolved_config.yaml", "overrides.yaml",
                                                       "environment.json")],
                   parent_run_id=os.environ.get(PARENT_ENV))


def discard_run_dir(folder: Path) -> None:
    """A job refused in validation (or a dry run) leaves no folder: Hydra made it, and its log file,
    before any check of ours ran. Only that log file is removed, then the folders if empty (a
    folder that held anything else before is left as it was)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            root.removeHandler(handler)
            handler.close()
            Path(handler.baseFilename).unlink(missing_ok=True)
    outputs = (Path.cwd() / "outputs").resolve()
    chain = [folder, *folder.resolve().parents]
    # the run's folder, then (in the default layout) its date folder, runs/ and outputs/ if now empty
    chain = chain[:chain.index(outputs) + 1] if outputs in chain else chain[:1]
    for empty in chain:
        try:
            empty.rmdir()
        except OSError:  # not empty (another run's, or the user's files), or already gone
            return


def objective(outcome) -> float | None:
    """What a search sweeper maximizes: decode tokens/s (sequences/s for encoders)."""
    metrics = outcome.results["generate"].metrics if "generate" in outcome.results else {}
    value = metrics.get("decode_tokens_per_s", metrics.get("sequences_per_s"))
    return float(value) if value is not None else None


def run_job(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    in_sweep = hc.mode == RunMode.MULTIRUN
    quiet.apply(OmegaConf.select(cfg, "pipeline.verbose", default=False) is True)  # before stages import packages
    try:
        resolved = resolve(cfg)
        plan = make_plan(resolved)
    except ConfigProblems as e:
        console.print_problems(e.problems)
        discard_run_dir(Path(hc.runtime.output_dir))
        sys.exit(EXIT_CONFIG)
    except StageError as e:
        console.print_problems([Problem(e.stage, e.message, e.hint)])
        discard_run_dir(Path(hc.runtime.output_dir))
        sys.exit(EXIT_CONFIG)
    console.print_warnings(resolved.warnings)
    if resolved.pipeline.dry_run:
        console.print_plan(resolved, plan)
        discard_run_dir(Path(hc.runtime.output_dir))
        return None
    output_dir = Path(hc.runtime.output_dir)
    tracker = make_tracker(resolved.tracker)
    if in_sweep and (resolved.pipeline.resume or resolved.pipeline.resume_from) and _reuse_finished(
            cfg, tracker, int(hc.job.num), resolved.pipeline.resume_from):
        return None
    job = job_info(cfg, resolved, output_dir)
    if resolved.launcher.kind == "torchrun":
        outcome = launch.launch_job(resolved, output_dir, tracker, job)
    else:
        outcome = execute(resolved, plan, output_dir, tracker, job)
    lost = getattr(tracker, "lost", None)
    results = write_results(output_dir, outcome, getattr(tracker, "run_id", None), lost)
    console.print_summary(outcome, tracker.where, getattr(tracker, "run_id", None))
    if lost:  # the numbers are real but the store does not hold them: not a success
        console.err.print(f"optipipe: tracking failed mid-run ({escape(lost)}); this run's results are "
                          f"only in {results}")
    if outcome.status != "FINISHED" or lost:
        if in_sweep:
            raise JobFailed(outcome.error or f"tracking failed: {lost}")
        sys.exit(EXIT_FAILED)
    return objective(outcome)


def _reuse_finished(cfg: DictConfig, tracker, job_num: int, from_sweep: str | None) -> bool:
    """With ``pipeline.resume=true`` a sweep skips a job that an earlier run of the same sweep (the
    same sweep arguments; or the sweep ``pipeline.resume_from`` names) finished with this exact
    config in this environment. Single runs and other sweeps never stand in."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None:
        return False  # not a sweep's job: nothing to resume from
    earlier = tracker.finished_run(config_hash(cfg), parent, from_sweep)
    if earlier is None:
        return False
    tracker.note_reused(parent, job_num, earlier)
    console.out.print(f"optipipe: skipped, this exact config already FINISHED as run {earlier} of "
                      f"{'sweep ' + from_sweep if from_sweep else 'an earlier run of this sweep'} "
                      "(drop pipeline.resume to run it again)")
    return True


def job_folder_name() -> str:
    """``<hash>_<pid>``: a short hash of this command's overrides (runs of one command share it, and
    a folder name never shows an override's value, secrets included), then the process id, so two
    jobs started in the same second never share a folder."""
    overrides = " ".join(a for a in sys.argv[1:] if not a.startswith("-"))
    return f"{hashlib.sha256(overrides.encode()).hexdigest()[:8]}_{os.getpid()}"


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def _hydra_entry(cfg: DictConfig) -> float | None:
    _state["job_started"] = True
    return run_job(cfg)


def main() -> None:
    redact_console()
    if not OmegaConf.has_resolver("optipipe_job"):  # run and sweep folders: conf/config.yaml
        OmegaConf.register_new_resolver("optipipe_job", job_folder_name)
    if sys.argv[1:2] == ["report"]:
        from pipeline.report_cli import main as report_main

        sys.exit(report_main(sys.argv[2:]))
    if sys.argv[1:2] == ["bench"]:
        from pipeline.bench import main as bench_main

        sys.exit(bench_main(sys.argv[2:]))
    early = problems_before_hydra(sys.argv[1:])
    if early:  # before Hydra: it would build hydra.* constructors before any check of ours runs
        console.print_problems(early)
        sys.exit(EXIT_CONFIG)
    status = "FAILED"
    signal.signal(signal.SIGTERM, stopping.raise_terminated)  # a scheduler's cancel ends runs as Ctrl-C does
    try:
        _hydra_entry()
        status = "FINISHED"
    except KeyboardInterrupt as e:
        status = "KILLED"
        terminated = isinstance(e, stopping.Terminated)
        console.err.print(f"[bold red]optipipe: {'terminated (SIGTERM)' if terminated else 'interrupted'}[/]")
        sys.exit(stopping.exit_code(e))
    except SystemExit as e:
        if e.code == 1 and not _state["job_started"]:
            # Hydra could not compose (unknown key, unknown option): a configuration problem.
            console.err.print("fix the override named above; `optipipe --help` lists the groups")
            sys.exit(EXIT_CONFIG)
        if e.code in (0, None):
            status = "FINISHED"
        raise
    finally:
        sweep.close_open_parent(status)


if __name__ == "__main__":
    main()
