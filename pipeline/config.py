"""Typed schemas of the non-stage config sections, and the check that turns YAML into them.

Every stage declares a dataclass ``Config``; ``typed`` checks a YAML node against it key by key so
that *all* unknown keys and wrong types are reported at once, each with its full key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.contract import Problem
from pipeline.redact import is_secret_key, redact


@dataclass
class ModelSpec:
    """What model to run. ``source=auto`` infers it from ``id``."""

    id: str = "smollm2-135m-instruct"  # hub id, local dir, .gguf file, embedded name, or random preset
    source: str = "auto"  # auto | hub | local | gguf | embedded | random
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    gguf_file: Optional[str] = None  # file name inside a hub repo / directory holding GGUF weights
    task: str = "causal_lm"  # causal_lm | encoder
    seed: int = 0  # random source: weights are a function of (preset, overrides, seed)
    config_overrides: dict[str, Any] = field(default_factory=dict)  # random source: e.g. {num_hidden_layers: 2}


@dataclass
class PipelineSettings:
    dry_run: bool = False
    allow: list[str] = field(default_factory=list)  # extra module prefixes allowed as _target_
    seed: int = 0
    resume: bool = False  # true: in a sweep, reuse a FINISHED job of an earlier run of the same sweep (same config, environment)
    resume_from: Optional[str] = None  # a sweep's parent run id: reuse FINISHED jobs of that sweep only (implies resume)
    memory_budget_gib: Optional[float] = None  # a job above it is infeasible: it ends early, FAILED
    verbose: bool = False  # true: third-party packages' own warnings and progress bars on the console
    allow_outside_outputs: bool = False  # true: hydra.run.dir / hydra.sweep.dir may lie outside ./outputs


@dataclass
class TrackerSettings:
    kind: str = "mlflow"  # mlflow | none
    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else sqlite under outputs/
    experiment: str = "optipipe"  # the MLflow experiment runs go to
    run_name: Optional[str] = None  # None: the command's overrides
    connect_timeout_s: float = 5.0  # per request to the tracking server: a dead one costs seconds, not the run


@dataclass
class LauncherSettings:
    kind: str = "local"  # local: one process | torchrun: the job re-runs itself under torch.distributed.run
    nproc_per_node: int = 1  # torchrun: processes (GPUs) per machine
    nnodes: int = 1  # torchrun: machines
    node_rank: int = 0  # torchrun: this machine's index (several machines)
    rdzv_endpoint: Optional[str] = None  # host:port of the rendezvous; None: 127.0.0.1 and a free port
    rdzv_backend: str = "c10d"
    rdzv_id: str = "optipipe"
    collective_timeout_s: float = 300.0  # a rank stuck in a collective this long fails the group
    max_seconds: Optional[float] = None  # the whole group is ended after this long (None: no limit)
    devices: Optional[list[int]] = None  # CUDA_VISIBLE_DEVICES of this job (None: inherit)
    split_devices: bool = False  # sweep jobs side by side: each leases nproc_per_node free GPUs (pipeline/gpu_lease.py)
    # with split_devices: a job's timed runs wait until no neighbour job loads or compiles, and none
    # starts while one is timed (pipeline/quiet_timing.py); false: time beside whatever runs
    quiet_timing: bool = True

    @property
    def processes(self) -> int:
        """How many processes the job runs: 1 unless torchrun."""
        return self.nproc_per_node * self.nnodes if self.kind == "torchrun" else 1


def compose(overrides: list[str]) -> DictConfig:
    """The config exactly as the CLI composes it from these overrides: inside a running ``optipipe``
    (its search path, ``--config-dir`` included) or, without a Hydra runtime, from our package."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="config", overrides=overrides)
    with initialize_config_module(version_base="1.3", config_module="conf"):
        return hydra_compose(config_name="config", overrides=overrides)


SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "pipeline": PipelineSettings,
    "tracker": TrackerSettings,
    "launcher": LauncherSettings,
}


def typed(schema: type, node: Any, prefix: str) -> tuple[Any, list[Problem]]:
    """Check ``node`` against dataclass ``schema``; return (instance or None, every problem)."""
    if node is None:
        node = {}
    if not isinstance(node, (dict, DictConfig)):
        return None, [Problem(prefix, f"expected a mapping, got {node!r}")]
    names = {f.name for f in dataclasses.fields(schema)}
    problems: list[Problem] = []
    clean: dict[str, Any] = {}
    items = node.items_ex(resolve=True) if isinstance(node, DictConfig) else node.items()
    for key, value in items:
        if key == "_target_":
            continue
        if key not in names:
            close = [n for n in sorted(names) if n.startswith(str(key)[:3])]
            problems.append(Problem(f"{prefix}.{key}", "unknown key",
                                    f"remove it; known keys of {prefix}: {', '.join(sorted(names))}"
                                    + (f" (did you mean {close[0]!r}?)" if close else "")))
            continue
        try:
            OmegaConf.merge(OmegaConf.structured(schema), {key: value})
        except OmegaConfBaseException as e:
            ftype = next(f.type for f in dataclasses.fields(schema) if f.name == key)
            problems.append(Problem(f"{prefix}.{key}", f"wrong type: {value!r} is not {ftype}"
                                    f" ({type(e).__name__}: {str(e).splitlines()[0]})",
                                    f"{prefix}.{key}=<{_type_word(ftype)}>"))
            continue
        clean[key] = value
    if problems:
        return None, problems
    merged = OmegaConf.merge(OmegaConf.structured(schema), clean)
    return OmegaConf.to_object(merged), []


def _type_word(ftype: Any) -> str:
    text = str(ftype)
    for word in ("int", "float", "bool", "str", "list", "dict"):
        if word in text:
            return word
    return text


def to_container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; secret-looking keys are dropped, never logged, and
    credentials inside values masked."""
    out: dict[str, Any] = {}
    data = to_container(node)
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if is_secret_key(key):
                continue
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = redact(v)
    return out
