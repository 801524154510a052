"""The load stage: decides dtype and device, checks the source, and loads the model once."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from pipeline import measure
from pipeline.contract import (WORST, BaseStage, LoadPlan, Problem, RunContext, StageError, StageResult, across,
                               local_rank)
from stages.load import sources
from stages.settings import LoadConfig

DTYPES = ("auto", "bfloat16", "float16", "float32")


def resolve_device(requested: str) -> str:
    """The device this process loads onto; a torchrun worker takes the GPU of its local rank."""
    import torch

    gpu = f"cuda:{local_rank()}"
    if requested == "auto":
        return gpu if torch.cuda.is_available() else "cpu"
    return gpu if requested == "cuda" else requested


class Load(BaseStage):
    name: ClassVar[str] = "load"
    Config: ClassVar[type] = LoadConfig

    def __init__(self, cfg: LoadConfig) -> None:
        super().__init__(cfg)
        self._result = StageResult()

    def problems(self, root: Any) -> list[Problem]:
        import torch

        problems = []
        if self.cfg.dtype not in DTYPES:
            problems.append(Problem("load.dtype", f"unknown dtype {self.cfg.dtype!r}",
                                    f"load.dtype=<one of {', '.join(DTYPES)}>"))
        dev = self.cfg.device
        if dev != "auto" and dev != "cpu" and not dev.startswith("cuda"):
            problems.append(Problem("load.device", f"unknown device {dev!r}",
                                    "load.device=auto|cpu|cuda|cuda:N"))
        elif dev.startswith("cuda") and not torch.cuda.is_available():
            problems.append(Problem("load.device", f"{dev!r} asked but no CUDA device is visible",
                                    "load.device=auto (or cpu)"))
        if self.cfg.num_threads is not None and self.cfg.num_threads < 1:
            problems.append(Problem("load.num_threads", f"must be ≥ 1 or null, got {self.cfg.num_threads}",
                                    f"load.num_threads={max(1, torch.get_num_threads())} (or null: torch's default)"))
        spec = root.model
        if spec.task not in ("causal_lm", "encoder"):
            problems.append(Problem("model.task", f"unknown task {spec.task!r}",
                                    "model.task=causal_lm|encoder"))
        problems += sources.check(spec, self.cfg.allow_pickle, self.cfg.trust_remote_code)
        return problems

    def device(self) -> str:
        return resolve_device(self.cfg.device)

    def torch_dtype_name(self) -> str:
        """The dtype random weights are created in (auto: bf16 on GPU, fp32 on CPU)."""
        if self.cfg.dtype != "auto":
            return self.cfg.dtype
        return "bfloat16" if self.device().startswith("cuda") else "float32"

    def plan(self, plan: LoadPlan) -> None:
        import torch

        plan.device = self.device()
        dtype = self.cfg.dtype if self.cfg.dtype == "auto" else getattr(torch, self.cfg.dtype)
        plan.set(self.name, "dtype", dtype)
        plan.set(self.name, "trust_remote_code", self.cfg.trust_remote_code)
        plan.set(self.name, "use_safetensors", None if self.cfg.allow_pickle else True)

    def materialize(self, plan: LoadPlan, record: bool = True) -> tuple[Any, Any]:
        """The one load: every stage's kwargs go into a single ``from_pretrained`` call.
        ``record=False`` loads without replacing this stage's result (the reference model)."""
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        import torch

        spec = plan.model
        if self.cfg.num_threads:  # before the load: conversion and every later kernel use it
            torch.set_num_threads(self.cfg.num_threads)
        start = time.perf_counter()
        ckpt = sources.checkpoint(spec, sources.cache_root(self.cfg.cache_dir), self.torch_dtype_name())
        prepared = time.perf_counter()
        auto = AutoModelForCausalLM if spec.task == "causal_lm" else AutoModel
        try:
            model = auto.from_pretrained(ckpt.path, **ckpt.kwargs, **plan.kwargs)
            tokenizer = AutoTokenizer.from_pretrained(
                ckpt.path, trust_remote_code=self.cfg.trust_remote_code, **ckpt.kwargs)
        except (OSError, ValueError, ImportError) as e:
            raise StageError("load", f"from_pretrained({ckpt.path!r}) failed: {e}",
                             "check model.id / model.revision; pickle weights need "
                             "load.allow_pickle=true") from e
        model.eval()
        if spec.task == "causal_lm":
            tokenizer.padding_side = "left"  # decoder-only batches must end on the last prompt token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        devices = measure.cuda_devices_in_use(model)
        loaded = measure.now(devices)
        metrics = {
            "seconds": loaded - start,
            "prepare_seconds": prepared - start,  # GGUF/random conversion, ~0 once cached
            "parameters": float(model.num_parameters()),
            "weight_bytes": float(measure.weight_bytes(model)),
            "cpu_threads": float(torch.get_num_threads()),
        }
        memory = {f"memory_{k}": v for k, v in measure.memory_now(devices).items()}
        metrics.update(memory)
        if not record:
            return model, tokenizer
        self._result = StageResult(
            metrics=metrics, seconds=loaded - start,
            across_ranks=across(WORST, ["seconds", "prepare_seconds", "weight_bytes", *memory]),
            tags={"model.source": ckpt.source, "model.dtype": str(model.dtype).removeprefix("torch."),
                  "model.class": type(model).__name__, "model.device": str(model.device)},
            summary=f"{type(model).__name__} {metrics['parameters'] / 1e6:.0f}M params, "
                    f"{metrics['weight_bytes'] / 2**30:.2f} GiB, {str(model.dtype).removeprefix('torch.')}"
                    f" on {model.device}" + (f", CPU threads: {torch.get_num_threads()}" if model.device.type == "cpu"
                                             else ""))
        return model, tokenizer

    def reference_plan(self, plan: LoadPlan, dtype: str | None) -> LoadPlan:
        """The unoptimized twin of ``plan``: same weights and device, eager attention, no quantization."""
        import torch

        ref = LoadPlan(model=plan.model)
        self.plan(ref)
        if dtype:
            ref.kwargs["dtype"] = getattr(torch, dtype)
        ref.kwargs.update(attn_implementation="eager", device_map={"": ref.device})
        return ref

    def apply(self, ctx: RunContext) -> StageResult:
        # what later stages need to rebuild or compare with the unoptimized model
        ctx.facts.parameters = float(ctx.model.num_parameters())
        ctx.facts.cache_dir = self.cfg.cache_dir
        # "auto": the checkpoint's own dtype, as loaded
        ctx.facts.load_dtype = self._result.tags["model.dtype"] if self.cfg.dtype == "auto" else self.torch_dtype_name()
        return self._result

    def describe(self) -> str:
        return f"Load(dtype={self.cfg.dtype}, device={self.device()})"
