"""Cross-stage rules: checks that need more than one section of the config.

Each rule takes the resolved config and returns problems; a rule never loads weights.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from pipeline.contract import MAX_HANDED_OVER, Problem, handed_over

Rule = Callable[[Any], list[Problem]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def check_all(resolved: Any) -> list[Problem]:
    return [p for r in RULES for p in r(resolved)]


@rule
def tracker_reachable(resolved: Any) -> list[Problem]:
    from pipeline.tracking import tracker_problems

    return tracker_problems(resolved.tracker)


@rule
def memory_budget_positive(resolved: Any) -> list[Problem]:
    budget = resolved.pipeline.memory_budget_gib
    if budget is None or budget > 0:
        return []
    return [Problem("pipeline.memory_budget_gib", f"must be > 0 GiB or null, got {budget}",
                    "pipeline.memory_budget_gib=null (no budget) or e.g. pipeline.memory_budget_gib=20")]


@rule
def resume_names_a_run(resolved: Any) -> list[Problem]:
    named = resolved.pipeline.resume_from
    if named is None or re.fullmatch(r"[0-9a-f]{32}", str(named)):
        return []
    return [Problem("pipeline.resume_from", f"{named!r} is not an MLflow run id (32 hex digits)",
                    "pipeline.resume_from=<the sweep's parent run id, printed as 'sweep parent run …'>")]


@rule
def config_fits_the_ranks_environment(resolved: Any) -> list[Problem]:
    """torchrun ranks receive the validated configuration in their environment, which has a size limit."""
    if resolved.launcher.kind != "torchrun":
        return []
    size = len(handed_over(resolved.cfg).encode())
    if size <= MAX_HANDED_OVER:
        return []
    return [Problem("launcher", f"the configuration is {size // 1024} KiB; torchrun ranks receive it in their "
                    f"environment, which takes at most {MAX_HANDED_OVER // 1024} KiB",
                    "move long lists into files: generate.prompt_file=… instead of generate.prompts, "
                    "generate.text_file=… instead of generate.texts")]


@rule
def launcher_known(resolved: Any) -> list[Problem]:
    launcher = resolved.launcher
    if launcher.kind not in ("local", "torchrun"):
        return [Problem("launcher.kind", f"unknown launcher {launcher.kind!r}", "launcher=local|torchrun")]
    if launcher.kind == "local":
        # a local job runs inside the sweep's worker process, whose CUDA devices are fixed at its first job
        return [Problem("launcher.split_devices", "a local job cannot lease GPUs of its own (it runs in the "
                        "sweep's process)", "launcher=torchrun (any nproc_per_node)")] if launcher.split_devices else []
    out = [Problem(f"launcher.{k}", f"must be ≥ {low}, got {v}", f"launcher.{k}={max(low, 1)}")
           for k, v, low in (("nproc_per_node", launcher.nproc_per_node, 1), ("nnodes", launcher.nnodes, 1))
           if v < low]
    if launcher.nnodes > 1 and not launcher.rdzv_endpoint:
        out.append(Problem("launcher.rdzv_endpoint", "several machines need a rendezvous address they "
                           "all reach", "launcher.rdzv_endpoint=<host of node 0>:29500"))
    if not 0 <= launcher.node_rank < max(launcher.nnodes, 1):
        out.append(Problem("launcher.node_rank", f"must be in [0, {launcher.nnodes})", "launcher.node_rank=0"))
    return out + _gpus_enough(resolved)


def _gpus_enough(resolved: Any) -> list[Problem]:
    """On GPUs, one process per GPU: asking for more processes than GPUs is refused."""
    from pipeline.environment import gpu_count

    launcher = resolved.launcher
    if not resolved.stages["load"].device().startswith("cuda"):
        return []
    have = len(launcher.devices) if launcher.devices else gpu_count()
    if have and launcher.nproc_per_node > have:
        return [Problem("launcher.nproc_per_node", f"{launcher.nproc_per_node} processes per machine "
                        f"but {have} GPU(s) visible", f"launcher.nproc_per_node={have}")]
    return []
