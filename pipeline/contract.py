"""The stage contract: what every stage is built from, adds to the load, and returns.

A run is: build every stage from its config (no I/O) → validate → every stage adds to one
``LoadPlan`` → the model is loaded once → every stage ``apply``s to the loaded model.

Design rules this module states in types:

- A stage fills ``Stage`` (``BaseStage`` gives defaults); ``load`` also ``Loader``; a ``shard`` whose
  replicas span several ranks also ``Placement``. A class that lacks part is refused at validation.
- Every mistake is found before any weight is read: each stage's ``problems(root)`` sees the whole
  resolved config and returns ``Problem``s that name the key and the override that fixes it.
- Stages know each other only through declared data: ``QuantizeTraits`` (what a quantizer's weights
  allow), ``stages.attention.AttentionKind`` (what an attention needs), ``Facts`` (what a stage
  hands on at run time), ``StageResult`` (what it measured) — never a class name or a free dict.
- What a run claims is checked: a stage reads back what it changed (the attention in effect, the
  kernel that ran, that compilation happened) and fails the run when it did not take effect.
- Imports go one way: this module and the typed config ← stages ← runner ← CLI (tested).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Protocol, runtime_checkable

STAGE_ORDER: tuple[str, ...] = ("load", "quantize", "convert", "shard", "generate", "evaluate")


class StageError(RuntimeError):
    """A stage could not do its job. The runner marks the run FAILED with this message."""

    def __init__(self, stage: str, message: str, hint: str = "") -> None:
        self.stage, self.message, self.hint = stage, message, hint
        super().__init__(f"[{stage}] {message}" + (f"\n  fix: {hint}" if hint else ""))


@dataclass
class Problem:
    """One thing wrong with the configuration, found before any weight is read."""

    key: str  # config key, e.g. "generate.batch_size"
    message: str  # what is wrong
    fix: str = ""  # the override (or action) that fixes it
    severity: str = "error"  # error (exit 2) | warning (printed, logged as a tag, run goes on)

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" + (f"\n    fix: {self.fix}" if self.fix else "")


def warning(key: str, message: str, fix: str = "") -> Problem:
    return Problem(key, message, fix, severity="warning")


class ConfigProblems(Exception):
    """Every problem found during validation, reported at once (exit code 2)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


RUN_ENV = "OPTIPIPE_WORKER_RUN_ID"  # set by the parent: this process is a torchrun worker of that run
CONFIG_ENV = "OPTIPIPE_WORKER_CONFIG"  # set by the parent: the validated configuration (pipeline/worker.py)
MAX_HANDED_OVER = 100_000  # bytes of it: Linux takes at most 128 KiB in one environment string


def handed_over(cfg: Any) -> str:
    """What the ranks find in ``CONFIG_ENV``: the job's configuration, every value resolved (in
    their environment only: it may hold secrets, which the run folder's files never do)."""
    import json

    from omegaconf import OmegaConf

    return json.dumps(OmegaConf.to_container(cfg, resolve=True))


def is_worker() -> bool:
    return bool(os.environ.get(RUN_ENV)) and "RANK" in os.environ


def local_rank() -> int:
    """This process's GPU index on its node: a stage may ask before the process group exists."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_worker() else 0


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class LoadPlan:
    """Everything ``from_pretrained`` will be called with; stages add to it before the one load."""

    model: Any = None  # the ModelSpec being loaded
    device: str = "cpu"  # where the load stage decided the model runs
    processes: int = 1  # processes of the job (torchrun), so a plan can be described before they exist
    # ranks each weight is split over inside from_pretrained (tensor parallel at load: torchao then
    # quantizes each rank's slice, whose input width is 1/weight_split of the layer's)
    weight_split: int = 1
    kwargs: dict[str, Any] = field(default_factory=dict)
    contributed_by: dict[str, str] = field(default_factory=dict)  # kwarg → stage name, for the plan print

    def set(self, stage: str, key: str, value: Any) -> None:
        """Set a kwarg; two stages setting the same kwarg differently is a bug in the config rules."""
        if key in self.kwargs and self.contributed_by[key] != stage and self.kwargs[key] != value:
            raise StageError(stage, f"from_pretrained kwarg {key!r} already set by stage "
                             f"{self.contributed_by[key]!r} to {self.kwargs[key]!r}")
        self.kwargs[key] = value
        self.contributed_by[key] = stage


def weight_split(resolved: Any) -> int:
    """``LoadPlan.weight_split`` of a resolved configuration: what its shard stage's optional
    ``load_split(processes)`` says, 1 for a stage that loads every weight whole."""
    split = getattr(resolved.stages.get("shard"), "load_split", None)
    return split(resolved.launcher.processes) if split else 1


# How the ranks' values of one metric become the run's value under torchrun. A stage declares it per
# metric in ``StageResult.across_ranks``; a metric it does not name is what every rank has alike (RANK0).
REPLICA_SUM = "replica_sum"  # throughput: replicas add up; the ranks of one replica share their tokens
WORST = "worst"  # latency, memory, seconds, bytes: the largest rank's value bounds the run
MEAN = "mean"  # a per-GPU fraction or rate (MBU, measured bandwidth)
RANK0 = "rank0"
ACROSS_RANKS = (REPLICA_SUM, WORST, MEAN, RANK0)


def across(how: str, metrics: dict[str, float] | list[str]) -> dict[str, str]:
    """``StageResult.across_ranks`` entries: every metric named in ``metrics`` combines as ``how``."""
    assert how in ACROSS_RANKS, how
    return dict.fromkeys(metrics, how)


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)  # names without the stage prefix
    across_ranks: dict[str, str] = field(default_factory=dict)  # metric → how ranks combine (ACROSS_RANKS)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    summary: str = ""  # one short line for the console table


class WorkloadHook(Protocol):
    """What a stage wraps around every timed workload (e.g. an SDPA kernel pin), and checks after
    the warm-up (e.g. that compilation really happened). Returns tags to log."""

    def context(self) -> ContextManager[None]: ...

    def after_warmup(self, model: Any) -> dict[str, str]: ...


@contextlib.contextmanager
def workload_context(hooks: list[WorkloadHook]) -> Iterator[None]:
    """Enter every stage's workload context (e.g. an SDPA kernel pin) around a workload."""
    with contextlib.ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(hook.context())
        yield


@dataclass
class Facts:
    """What a stage learns and a later stage (or the runner) reads, one typed field per fact: the
    hand-over between stages is written here, not in a free-form dict. A plugin stage keeps its own
    facts in ``extra`` under its stage name."""

    model_spec: Any = None  # runner: the ModelSpec that was loaded
    parameters: float = 0.0  # load: parameter count of the loaded model
    load_dtype: str = ""  # load: the dtype as loaded (``auto`` resolved to the checkpoint's)
    cache_dir: str | None = None  # load: where converted and random weights are cached
    tensor_parallel: int = 1  # shard: ranks each weight is split over (generate's bandwidth floor)
    replica: tuple[int, int] = (0, 1)  # shard: (this rank's replica, replicas): its share of the prompts
    corpus_sha: str = ""  # evaluate: the corpus its reference cache is keyed on
    partial_result: StageResult | None = None  # a stage failing after it measured: the runner logs these
    extra: dict[str, Any] = field(default_factory=dict)  # plugin stages: {stage name: anything}


@dataclass
class RunContext:
    cfg: Any  # the resolved root DictConfig
    output_dir: Path
    dist: DistInfo
    model: Any = None
    tokenizer: Any = None
    reference: Callable[[], Any] | None = None  # lazily builds the unoptimized model
    generate_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. cache_implementation
    workload_hooks: list[WorkloadHook] = field(default_factory=list)
    facts: Facts = field(default_factory=Facts)  # what stages learned for later stages


@dataclass(frozen=True)
class QuantizeTraits:
    """What a quantize stage's weights let later stages do. Rules read these, never a class name,
    so a plugin quantizer states them once (class attribute ``traits``) and every rule follows."""

    quantizes: bool = False  # the weights change at all
    compileable: bool = True  # torch.compile can trace its matmul kernels (convert.compile, generate=fast)
    tp_shardable: bool = True  # transformers' tensor-parallel plan can shard its weights
    joinable: bool = True  # its weights are plain tensors that generate=fast can join (q/k/v, gate/up)
    kernel: str = "dense"  # what runs its matmuls, for messages


def quantize_traits(root: Any) -> QuantizeTraits:
    """The traits of the configured quantize stage (a stage that states none: plain weights)."""
    return getattr(root.stages["quantize"], "traits", QuantizeTraits())


@dataclass(frozen=True)
class ConvertTraits:
    """What a convert stage set up for transformers' own ``generate`` (read by rules, like
    ``QuantizeTraits``): an engine with its own cache and compiled step conflicts with it."""

    prepares_generate: bool = False  # a static KV cache or a compiled forward for model.generate


def convert_traits(root: Any) -> ConvertTraits:
    """The traits of the configured convert stage (a stage that states none: nothing set up)."""
    return getattr(root.stages["convert"], "traits", ConvertTraits())


@runtime_checkable
class Stage(Protocol):
    """Built as ``Cls(config)`` during validation; ``problems`` with every stage built; then ``plan``
    for all stages, one load, ``apply``. ``BaseStage`` gives each a harmless default."""

    name: ClassVar[str]
    Config: ClassVar[type]  # a dataclass: the typed schema of this stage's YAML

    def problems(self, root: Any) -> list[Problem]: ...  # rules this stage owns, before any I/O

    def plan(self, plan: LoadPlan) -> None: ...

    def apply(self, ctx: RunContext) -> StageResult: ...

    def describe(self) -> str: ...  # one line for the plan print


@runtime_checkable
class Loader(Stage, Protocol):
    """What the runner and the cross-stage rules need from the ``load`` stage, beyond a Stage."""

    def device(self) -> str: ...  # where the model will run, e.g. "cuda:0" or "cpu"

    def torch_dtype_name(self) -> str: ...  # the dtype it loads in, e.g. "bfloat16"

    def materialize(self, plan: LoadPlan, record: bool = True) -> tuple[Any, Any]: ...  # (model, tokenizer)

    def reference_plan(self, plan: LoadPlan, dtype: str | None) -> LoadPlan: ...  # the unoptimized model's


@runtime_checkable
class Placement(Protocol):
    """A ``shard`` stage whose replicas span several ranks says how many: the ranks of one replica
    share their tokens, so their throughputs are not added up. A shard stage without it: 1."""

    def ranks_per_replica(self, world: int) -> int: ...


def missing_methods(cls: type, protocol: type) -> list[str]:
    """The methods of ``protocol`` that ``cls`` lacks (its ``Config`` is checked by the caller)."""
    wanted = [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
    for base in protocol.__mro__[1:]:
        if base is not Protocol and getattr(base, "_is_protocol", False):
            wanted += [n for n, v in vars(base).items() if callable(v) and not n.startswith("_")]
    return sorted({n for n in wanted if not callable(getattr(cls, n, None))})


@dataclass
class NoSettings:
    """The typed config of an option that takes no settings (any key given to it is an error)."""


class BaseStage:
    """The base of every shipped stage: no problems, no load contribution, nothing to apply."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def problems(self, root: Any) -> list[Problem]:
        """Rules this stage checks against the whole config (no I/O beyond small files)."""
        return []

    def plan(self, plan: LoadPlan) -> None:
        return None

    def apply(self, ctx: RunContext) -> StageResult:
        return StageResult()

    def describe(self) -> str:
        return type(self).__name__
