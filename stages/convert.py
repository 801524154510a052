"""convert stage: attention implementation, SDPA kernel pinning, static KV cache and compile.

Each choice is checked before loading (dtype, device, packages) and read back after: the attention
implementation from the model config, the SDPA kernel that really ran from a profiler trace, and
compilation from the model after the warm-up.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator

import torch

from pipeline import measure, quiet
from pipeline.contract import (BaseStage, ConvertTraits, LoadPlan, Problem, RunContext, StageError, StageResult,
                               quantize_traits, warning, workload_context)
from stages.attention import AttentionKind, lookup
from stages.settings import AttentionConfig
# Our names for torch.nn.attention.SDPBackend members, and the aten op each one shows in a trace.
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH",
                 "cudnn": "CUDNN_ATTENTION"}
SDPA_OPS = {"_scaled_dot_product_flash_attention": "flash",
            "_scaled_dot_product_flash_attention_for_cpu": "flash",
            "_scaled_dot_product_efficient_attention": "efficient",
            "_scaled_dot_product_cudnn_attention": "cudnn",
            "_scaled_dot_product_attention_math": "math"}
# What PyTorch says when no pinned kernel fits: CUDA and CPU word it differently.
NO_KERNEL_MESSAGES = ("No available kernel", "No viable backend for scaled_dot_product_attention")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def explain_no_kernel(backends: list[str], model: Any) -> str:
    """Why PyTorch found no SDPA kernel for this pin, in terms the user can act on."""
    reasons = []
    dtype, device = model.dtype, model.device
    if "flash" in backends and device.type == "cuda" and dtype == torch.float32:
        reasons.append("the flash kernel needs float16/bfloat16 and the model is float32")
    if "efficient" in backends and device.type == "cpu":
        reasons.append("the memory-efficient kernel exists only on CUDA")
    if "cudnn" in backends and device.type == "cpu":
        reasons.append("the cuDNN kernel exists only on CUDA")
    head_dim = getattr(model.config, "head_dim", None) or (
        model.config.hidden_size // model.config.num_attention_heads)
    if "flash" in backends and device.type == "cuda" and head_dim > 256:
        reasons.append(f"head size {head_dim} is above the flash kernel's 256")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if "flash" in backends and major < 8:
            reasons.append(f"the flash kernel needs compute capability ≥ 8.0; this GPU is {major}.{minor}")
    if not reasons:
        reasons.append("the inputs (mask, shapes or dtype) are outside what these kernels accept; "
                       "PyTorch's warnings above name the exact condition")
    return "; ".join(reasons)


class SdpaPin:
    """Wraps each workload in ``sdpa_kernel(backends)`` and turns "No available kernel" into advice."""

    def __init__(self, backends: list[str], model: Any) -> None:
        self.backends, self.model = backends, model

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = [getattr(SDPBackend, SDPA_BACKENDS[b]) for b in self.backends]
        try:
            with sdpa_kernel(chosen):
                yield
        except RuntimeError as e:
            if not any(text in str(e) for text in NO_KERNEL_MESSAGES):
                raise
            raise StageError("convert", f"SDPA pinned to {self.backends} found no usable kernel: "
                             f"{explain_no_kernel(self.backends, self.model)}",
                             "load.dtype=bfloat16, or widen the pin, e.g. "
                             "'convert.sdpa_backends=[flash,efficient,math]', or convert=sdpa") from e

    def after_warmup(self, model: Any) -> dict[str, str]:
        return {}


class CompileCheck:
    """Compilation happens inside the first warm-up; afterwards transformers holds the compiled call."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def context(self):
        return contextlib.nullcontext()

    def after_warmup(self, model: Any) -> dict[str, str]:
        if getattr(model, "_compiled_call", None) is None:
            why = ("bitsandbytes models are not compileable in transformers"
                   if getattr(getattr(model, "hf_quantizer", None), "is_compileable", True) is False
                   else "transformers' auto-compile criteria were not met")
            raise StageError("convert", f"convert.compile=true but the model was not compiled: {why}",
                             "quantize=none, or convert.compile=false")
        return {"convert.compiled": "true", "convert.compile_mode": self.mode}


def observed_sdpa_backends(model: Any, tokenizer: Any, hooks: list) -> list[str]:
    """Run one short forward under the profiler and name the SDPA kernels that ran."""
    from torch.profiler import profile

    ids = torch.tensor([[tokenizer.bos_token_id or 1] * 8], device=measure.input_device(model))
    with quiet.native_stderr(), workload_context(hooks), profile() as prof, torch.inference_mode():
        model(input_ids=ids)
    names = {e.key.removeprefix("aten::") for e in prof.key_averages()}
    return sorted({backend for op, backend in SDPA_OPS.items() if op in names})


class Attention(BaseStage):
    name: ClassVar[str] = "convert"
    Config: ClassVar[type] = AttentionConfig

    @property
    def traits(self) -> ConvertTraits:
        return ConvertTraits(prepares_generate=self.cfg.static_cache or self.cfg.compile)

    def kind(self, allow: list[str] | None = None) -> AttentionKind:
        """The attention ``convert.implementation`` names (validation looked it up with the run's
        allow-list and keeps it)."""
        if getattr(self, "_kind", None) is None:
            self._kind, problems = lookup(self.cfg.implementation, allow or [])
            if problems:
                raise StageError(self.name, "; ".join(str(p) for p in problems))
        return self._kind

    def problems(self, root: Any) -> list[Problem]:
        c, out = self.cfg, []
        self._kind, found = lookup(c.implementation, list(root.pipeline.allow))
        if found:
            return found
        unknown = [b for b in c.sdpa_backends if b not in SDPA_BACKENDS]
        if unknown:
            out.append(Problem("convert.sdpa_backends", f"unknown SDPA backend(s) {unknown}",
                               f"convert.sdpa_backends=[{','.join(SDPA_BACKENDS)}] (any subset)"))
        if c.sdpa_backends and not self._kind.sdpa_kernels:
            out.append(Problem("convert.sdpa_backends", f"a kernel pin only applies to SDPA; {self._kind.name} "
                               "runs other kernels", "convert.implementation=sdpa"))
        if c.compile and not c.static_cache:
            out.append(Problem("convert.compile", "compiling the decode step needs fixed shapes: a "
                               "static KV cache", "convert.static_cache=true"))
        if c.compile_mode not in COMPILE_MODES:
            out.append(Problem("convert.compile_mode", f"unknown mode {c.compile_mode!r}",
                               f"convert.compile_mode=<one of {', '.join(COMPILE_MODES)}>"))
        return out + self._device_rules(root)

    def _device_rules(self, root: Any) -> list[Problem]:
        c, out = self.cfg, []
        load = root.stages["load"]
        device, dtype = load.device(), load.torch_dtype_name()
        out += self._kind.problems(device, dtype)
        if c.sdpa_backends == ["flash"] and device.startswith("cuda") and dtype == "float32":
            out.append(Problem("load.dtype", "flash attention kernels need float16 or bfloat16 on "
                               "CUDA; the model loads as float32", "load.dtype=bfloat16"))
        traits = quantize_traits(root)
        if c.compile and not traits.compileable:
            out.append(warning("convert.compile", f"transformers does not compile {traits.kernel} models "
                               "(their kernels are not compileable): the run will fail its compile "
                               "check", "quantize=none, or convert.compile=false"))
        return out

    def plan(self, plan: LoadPlan) -> None:
        kind = self.kind()
        if kind.register is not None:  # ours or a plugin's: transformers must know the name before loading
            kind.register()
        plan.set(self.name, "attn_implementation", kind.name)

    def generate_kwargs(self, device_type: str) -> dict[str, Any]:
        c = self.cfg
        kw: dict[str, Any] = {}
        if c.static_cache:
            kw["cache_implementation"] = "static"
        if c.compile:
            from transformers import CompileConfig

            cc = CompileConfig(fullgraph=c.fullgraph, dynamic=c.dynamic, mode=c.compile_mode)
            # transformers auto-compiles on accelerators only; this opt-in makes CPU compile too.
            cc._compile_all_devices = device_type == "cpu"
            kw["compile_config"] = cc
        else:
            kw["disable_compile"] = True  # what was asked is what runs: no silent auto-compile
        return kw

    def apply(self, ctx: RunContext) -> StageResult:
        c, model = self.cfg, ctx.model
        in_effect = getattr(model.config, "_attn_implementation", None)
        if in_effect != self.kind().name:
            raise StageError(self.name, f"asked for attention {self.kind().name!r} but the loaded "
                             f"model uses {in_effect!r}", "this architecture may not support it; "
                             "try convert=sdpa or convert=eager")
        if c.sdpa_backends:
            ctx.workload_hooks.append(SdpaPin(c.sdpa_backends, model))
        if c.compile:
            ctx.workload_hooks.append(CompileCheck(c.compile_mode))
        ctx.generate_kwargs.update(self.generate_kwargs(model.device.type))
        tags = {"convert.attn_implementation": in_effect, "convert.static_cache": str(c.static_cache),
                "convert.compile": str(c.compile)}
        if self.kind().sdpa_kernels and ctx.tokenizer is not None:
            observed = observed_sdpa_backends(model, ctx.tokenizer, ctx.workload_hooks)
            tags["convert.sdpa_backend_observed"] = ",".join(observed) or "none"
            if c.sdpa_backends and not set(observed) <= set(c.sdpa_backends):
                raise StageError(self.name, f"SDPA pinned to {c.sdpa_backends} but {observed} ran")
        extra = f", SDPA kernel {tags.get('convert.sdpa_backend_observed')}" if self.kind().sdpa_kernels else ""
        cache = ", static cache" if c.static_cache else ""
        comp = f", compile {c.compile_mode}" if c.compile else ""
        return StageResult(tags=tags, summary=f"attention {in_effect}{extra}{cache}{comp} (read back)")

    def describe(self) -> str:
        pin = f", pin={self.cfg.sdpa_backends}" if self.cfg.sdpa_backends else ""
        return f"Attention({self.cfg.implementation}{pin}, static_cache={self.cfg.static_cache}, compile={self.cfg.compile})"
