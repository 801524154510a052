"""The run: plan → one load → apply every stage → track. Knows nothing about Hydra."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import quiet_timing
from pipeline.contract import DistInfo, LoadPlan, RunContext, StageError, StageResult, weight_split
from pipeline.stopping import interrupted_why, signals_held
from pipeline.tracking import JobInfo, Tracker
from pipeline.resolved import Resolved


@dataclass
class RunOutcome:
    results: dict[str, StageResult] = field(default_factory=dict)
    status: str = "FINISHED"
    error: str | None = None


RESULTS_FILE = "metrics.json"


def write_results(output_dir: Path, outcome: RunOutcome, run_id: str | None,
                  tracking_error: str | None = None) -> Path:
    """The run's numbers beside its config in the run directory, tracked or not (``tracker=none``):
    every stage metric as ``<stage>/<metric>``, the tags, the status, the MLflow run id and, when
    tracking failed mid-run, why (then this file is the only record of the numbers)."""
    def number(v: float) -> float | None:
        return None if v != v else v  # JSON has no NaN

    data = {"status": outcome.status, "error": outcome.error, "mlflow_run_id": run_id, "tracking_error": tracking_error,
            "metrics": {f"{stage}/{k}": number(v) for stage, r in outcome.results.items() for k, v in r.metrics.items()},
            "tags": {k: v for r in outcome.results.values() for k, v in r.tags.items()},
            "environment_file": "environment.json"}
    path = output_dir / RESULTS_FILE
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def make_plan(resolved: Resolved) -> LoadPlan:
    """Every stage adds its ``from_pretrained`` kwargs; nothing is read from disk yet."""
    plan = LoadPlan(model=resolved.model, processes=resolved.launcher.processes, weight_split=weight_split(resolved))
    for stage in resolved.stages.values():
        stage.plan(plan)
    return plan


def open_context(resolved: Resolved, plan: LoadPlan, output_dir: Path, dist: DistInfo | None = None) -> RunContext:
    """The one load, and a context that can rebuild the unoptimized model for comparison."""
    ctx = RunContext(cfg=resolved.cfg, output_dir=output_dir, dist=dist or DistInfo(device=plan.device))
    load = resolved.stages["load"]
    ctx.model, ctx.tokenizer = load.materialize(plan)
    ctx.facts.model_spec = resolved.model
    ctx.reference = lambda dtype=None: load.materialize(load.reference_plan(plan, dtype), record=False)
    return ctx


def check_budget(budget_gib: float | None, stage: str, result: StageResult) -> None:
    """End an infeasible job as early as it is known: weights after load, peak memory after generate."""
    if budget_gib is None:
        return
    keys = {"load": ("weight_bytes",), "quantize": ("weight_bytes",),
            "generate": ("memory_peak_allocated_gib", "memory_peak_rss_gib")}.get(stage, ())
    for key in keys:
        if key in result.metrics:
            gib = result.metrics[key] / (2**30 if key.endswith("bytes") else 1)
            if gib > budget_gib:
                raise StageError(stage, f"infeasible: {key} = {gib:.2f} GiB exceeds "
                                 f"pipeline.memory_budget_gib={budget_gib}", "a smaller configuration, "
                                 "or raise pipeline.memory_budget_gib")


def finish_run(tracker: Tracker, status: str, error: str | None = None) -> None:
    """End the run; a second Ctrl-C (or a SIGTERM) arriving meanwhile would stop the closing half
    way and leave the run RUNNING, so both are ignored until it is closed (the first one already
    decided how the process ends)."""
    with signals_held():
        tracker.finish(status, error)


def out_of_memory(e: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU's: Python's MemoryError or torch's CPU allocator
    giving up (a RuntimeError naming it)."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and "DefaultCPUAllocator" in str(e)


def execute(resolved: Resolved, plan: LoadPlan, output_dir: Path, tracker: Tracker, job: JobInfo,
            dist: DistInfo | None = None) -> RunOutcome:
    """Load once, apply each stage in order, log as we go; a failure marks the run FAILED."""
    outcome = RunOutcome()
    output_dir.mkdir(parents=True, exist_ok=True)
    ctx = None
    try:
        tracker.start(job)  # inside: a Ctrl-C while the run is being created still ends it KILLED
        # beside other jobs (if asked): load and compile only while none is timed
        quiet_timing.start_busy(holder=(dist or DistInfo()).local_rank == 0,
                                max_wait_s=quiet_timing.wait_limit(resolved.launcher.collective_timeout_s))
        ctx = open_context(resolved, plan, output_dir, dist)
        for name, stage in resolved.stages.items():
            start = time.perf_counter()
            result = stage.apply(ctx)
            result.seconds = result.seconds or time.perf_counter() - start
            outcome.results[name] = result
            tracker.log_result(name, result)
            check_budget(resolved.pipeline.memory_budget_gib, name, result)
    except KeyboardInterrupt as e:
        outcome.status, outcome.error = "KILLED", interrupted_why(e)
        finish_run(tracker, outcome.status, outcome.error)
        raise
    except StageError as e:
        partial = ctx.facts.partial_result if ctx else None
        if partial is not None:  # e.g. a failed quality gate: its numbers explain the failure
            outcome.results[e.stage] = partial
            tracker.log_result(e.stage, partial)
        outcome.status, outcome.error = "FAILED", str(e)
        finish_run(tracker, outcome.status, outcome.error)
        return outcome
    except BaseException as e:
        if out_of_memory(e):  # a property of the configuration, not a bug: say what to change
            outcome.status = "FAILED"
            outcome.error = (f"out of memory: {str(e).strip().splitlines()[0]}\n  fix: lower generate.batch_size, "
                             "quantize=nf4, load.dtype=bfloat16, or spread the model (shard=…)")
            finish_run(tracker, outcome.status, outcome.error)
            return outcome
        finish_run(tracker, "FAILED", f"{type(e).__name__}: {e}")  # our bug: record it, let the traceback through
        raise
    finish_run(tracker, outcome.status)
    return outcome
