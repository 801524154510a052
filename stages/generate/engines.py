"""Decode engines: what turns a batch of encoded prompts into tokens inside the generate stage.

``generate.engine`` names one: a built-in (``transformers``, ``fast``) or the dotted path of a class
from an allowed module (the same allow-list as ``_target_``: ``stages.*``, plugin packages,
``pipeline.allow``). A new engine is one class that fills ``Engine`` plus one YAML that selects it
(``defaults: [default, _self_]`` and ``engine: my_package.MyEngine``); its own settings come from
``generate.engine_options``, checked against its ``Config`` dataclass if it has one. The generate
stage times, profiles and records whatever engine runs; other stages never ask which one it is.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from pipeline import measure
from pipeline.config import typed
from pipeline.contract import Problem, StageError, convert_traits, missing_methods, quantize_traits, warning
from pipeline.registry import built_in_or_allowed
from stages.attention.gqa_decode import KERNELS as DECODE_KERNELS, SPLIT_KV
from stages.convert import COMPILE_MODES
from stages.load.sources import architecture
from stages.generate import auto_levers
from stages.generate.auto_levers import AUTO
from stages.generate.engine import FastDecoder, Sampling


@runtime_checkable
class Engine(Protocol):
    """Built as ``Cls(settings, options)`` once per stage: ``settings`` the generate stage's typed
    config, ``options`` its ``engine_options`` typed by the engine's ``Config`` (None without one)."""

    name: ClassVar[str]  # recorded as tag generate.engine

    def problems(self, root: Any) -> list[Problem]: ...  # checked with the rest of the config, before loading

    def compiled(self) -> bool: ...  # whether its decode step is compiled (bench's "compiled" column)

    def generate(self, model: Any, inputs: dict[str, torch.Tensor], kwargs: dict[str, Any], eos: list[int],
                 clock: Any) -> torch.Tensor: ...  # prompt + new tokens; calls clock(input_ids, logits) per step

    def tags(self, model: Any) -> dict[str, str]: ...  # after the timed runs: what it ran with


class TransformersEngine:
    """``model.generate``, with the stage's step clock as a logits processor."""

    name: ClassVar[str] = "transformers"

    def __init__(self, settings: Any, options: Any = None) -> None:
        self.settings = settings

    def problems(self, root: Any) -> list[Problem]:
        return []

    def compiled(self) -> bool:
        return False  # convert.compile compiles the model itself; bench reads that from the model

    def generate(self, model, inputs, kwargs, eos, clock) -> torch.Tensor:
        from transformers import LogitsProcessorList

        with torch.inference_mode():
            return model.generate(**inputs, **kwargs, logits_processor=LogitsProcessorList([clock]))

    def tags(self, model: Any) -> dict[str, str]:
        return {}


class FastEngine:
    """Our static-cache engine: prefill once, then one compiled decode step replayed per token
    (``stages/generate/engine.py``). Its settings are the ``generate.fast_*`` keys."""

    name: ClassVar[str] = "fast"

    def __init__(self, settings: Any, options: Any = None) -> None:
        self.settings = settings

    def problems(self, root: Any) -> list[Problem]:
        c, out = self.settings, []
        if c.fast_compile_mode is not None and c.fast_compile_mode not in COMPILE_MODES:
            out.append(Problem("generate.fast_compile_mode", f"unknown mode {c.fast_compile_mode!r}",
                               f"generate.fast_compile_mode=<one of {', '.join(COMPILE_MODES)}> or null"))
        if c.fast_fuse_projections and c.fast_compile_mode is None:
            out.append(Problem("generate.fast_fuse_projections", "projections are fused by compiling the "
                               "decode step, and generate.fast_compile_mode=null runs it eager",
                               "generate.fast_fuse_projections=false, or a generate.fast_compile_mode"))
        if c.fast_realize_opcount is not None and c.fast_realize_opcount < 1:
            out.append(Problem("generate.fast_realize_opcount", f"{c.fast_realize_opcount} is not a number of ops",
                               "generate.fast_realize_opcount=4, or null for inductor's own threshold"))
        out.extend(prefill_graph_problems(c, root))
        if c.fast_decode_attention not in (AUTO, *DECODE_KERNELS):
            out.append(Problem("generate.fast_decode_attention", f"unknown kernel {c.fast_decode_attention!r}",
                               f"generate.fast_decode_attention=<one of {', '.join((AUTO, *DECODE_KERNELS))}>"))
        elif c.fast_decode_attention == SPLIT_KV:
            out.extend(split_kv_problems(c, root))
        if c.fast_pdl:
            out.extend(pdl_problems(c, root))
        if convert_traits(root).prepares_generate:
            out.append(Problem("convert", "generate=fast brings its own static cache and compiled "
                               "decode step; convert.static_cache/compile apply to transformers "
                               "generate only", "convert=sdpa (or generate.engine=transformers)"))
        traits = quantize_traits(root)
        if c.fast_fuse_projections and not traits.joinable:
            out.append(warning("generate.fast_fuse_projections", f"{traits.kernel} weights are not plain tensors, "
                               "so q/k/v and gate/up cannot be joined: they stay apart",
                               "generate.fast_fuse_projections=false, or quantize=none"))
        if c.fast_compile_mode and not traits.compileable:
            out.append(Problem("generate.fast_compile_mode", f"{traits.kernel} kernels cannot be compiled",
                               "generate.fast_compile_mode=null, or a compileable quantize=int8_torchao"))
        return out

    def compiled(self) -> bool:
        return self.settings.fast_compile_mode is not None

    def decoder(self, model: Any) -> FastDecoder:
        """One decoder per model: its static cache and captured step are reused across repeats."""
        c = self.settings
        devices = set((getattr(model, "hf_device_map", None) or {}).values())
        if c.fast_compile_mode and len(devices) > 1:  # found on GPUs: dynamo refuses accelerate's hooks
            raise StageError("generate", f"the model is split over {len(devices)} devices by accelerate; the "
                             "compiled decode step cannot cross its device hooks", "shard.device_map=sequential "
                             "(whole on the first GPU when it fits), shard=tensor_parallel, or "
                             "generate.fast_compile_mode=null")
        found = getattr(model, "_optipipe_fast_decoder", None)
        if found is None:
            sampling = Sampling(c.do_sample, c.temperature, c.top_k, c.top_p)
            levers = auto_levers.for_model(model, c)  # after the shard stage: whether the layers are TP's
            found = FastDecoder(model, c.fast_compile_mode, c.stop_check_every, sampling, c.fast_gqa_attention,
                                c.fast_compile_prefill, c.fast_coordinate_descent, self.joins_projections(model),
                                c.fast_realize_opcount, levers.decode_attention, levers.pdl, levers.why,
                                c.fast_prefill_bucket if c.fast_prefill_graph else None)
            model._optipipe_fast_decoder = found
        return found

    def joins_projections(self, model: Any) -> bool:
        """The setting, or when unset: join whenever the step compiles and no weight is a quantized
        tensor subclass (same-host H200 pair, batch 1: 207.3 tok/s joined, 173.1 apart; BENCHMARKS.md)."""
        c = self.settings
        if c.fast_fuse_projections is not None:
            return bool(c.fast_fuse_projections)
        return c.fast_compile_mode is not None and not any(measure.is_wrapper(p) for p in model.parameters())

    def generate(self, model, inputs, kwargs, eos, clock) -> torch.Tensor:
        return self.decoder(model).generate(inputs["input_ids"], inputs["attention_mask"], kwargs["max_new_tokens"],
                                            eos, kwargs["pad_token_id"], kwargs.get("min_new_tokens", 0), clock=clock)

    def tags(self, model: Any) -> dict[str, str]:
        decoder = self.decoder(model)  # what the decode steps attended with (the model's own, or ours for GQA)
        return {"generate.decode_attention": decoder.decode_attention(), "generate.kernel_tuning": decoder.kernel_tuning(),
                "generate.fused_projections": decoder.fused_projections(), "generate.token_choice": decoder.token_choice(),
                "generate.all_reduce_norm": decoder.all_reduce_norm(), "generate.realize_opcount": decoder.realize_threshold(),
                "generate.kernel_launch": decoder.launch(), "generate.levers": decoder.levers,
                "generate.cuda_graphs": decoder.cuda_graphs(), "generate.prefill": decoder.prefill()}


def prefill_graph_problems(c: Any, root: Any) -> list[Problem]:
    """The prefill's CUDA graph: made by compiling the prefill, per padded prompt length, on CUDA."""
    out = []
    if c.fast_prefill_bucket < 1:
        out.append(Problem("generate.fast_prefill_bucket", f"{c.fast_prefill_bucket} is not a number of tokens",
                           "generate.fast_prefill_bucket=64"))
    if not c.fast_prefill_graph:
        return out
    if not c.fast_compile_prefill:
        out.append(Problem("generate.fast_prefill_graph", "the prefill's CUDA graph is made when the prefill "
                           "compiles, and generate.fast_compile_prefill is off",
                           "generate.fast_compile_prefill=true, or generate.fast_prefill_graph=false"))
    if not root.stages["load"].device().startswith("cuda"):
        out.append(warning("generate.fast_prefill_graph", "CUDA graphs are a CUDA feature: on this device the "
                           "prefill compiles and prompts are padded, without a graph",
                           "generate.fast_prefill_graph=false (on CPU)"))
    return out


def split_kv_problems(c: Any, root: Any) -> list[Problem]:
    """Our split decode-attention kernel: Triton on CUDA, in the grouped-query decode path."""
    import importlib.util

    out = []
    if not c.fast_gqa_attention:
        out.append(Problem("generate.fast_decode_attention", "split_kv runs inside the grouped-query decode "
                           "attention, which generate.fast_gqa_attention=false turns off",
                           "generate.fast_gqa_attention=true, or generate.fast_decode_attention=sdpa"))
    if not root.stages["load"].device().startswith("cuda"):
        out.append(Problem("generate.fast_decode_attention", "split_kv is a Triton kernel for CUDA GPUs",
                           "generate.fast_decode_attention=sdpa (on CPU)"))
    elif importlib.util.find_spec("triton") is None:
        out.append(Problem("generate.fast_decode_attention", "split_kv needs the triton package, which is "
                           "not installed", "pip install triton, or generate.fast_decode_attention=sdpa"))
    arch = architecture(root.model) or {}
    heads, kv_heads = arch.get("num_attention_heads"), arch.get("num_key_value_heads")
    if heads and kv_heads and kv_heads >= heads:  # unknown shapes: not judged
        out.append(warning("generate.fast_decode_attention", f"the model has {kv_heads} key/value heads for {heads} "
                           "query heads (not grouped-query), so its decode steps keep its own attention and "
                           "split_kv does not run (the run's generate.decode_attention tag says so)",
                           "generate.fast_decode_attention=sdpa"))
    return out


def pdl_problems(c: Any, root: Any) -> list[Problem]:
    """Programmatic dependent launch: inductor's, in a compiled step, on CUDA."""
    out = []
    if c.fast_compile_mode is None:
        out.append(Problem("generate.fast_pdl", "inductor emits programmatic dependent launches when it compiles "
                           "the decode step, and generate.fast_compile_mode=null runs it eager",
                           "generate.fast_pdl=false, or a generate.fast_compile_mode"))
    if not root.stages["load"].device().startswith("cuda"):
        out.append(Problem("generate.fast_pdl", "programmatic dependent launch is a feature of CUDA GPUs "
                           "(compute capability 9.0 and newer)", "generate.fast_pdl=false (on CPU)"))
    elif not auto_levers.inductor_has_pdl():
        out.append(Problem("generate.fast_pdl", f"this torch ({torch.__version__}) has no inductor option "
                           "triton.enable_pdl", "generate.fast_pdl=false, or a newer torch"))
    return out


BUILT_IN: dict[str, type] = {"transformers": TransformersEngine, "fast": FastEngine}


def engine_class(value: str, allow: list[str]) -> tuple[type | None, list[Problem]]:
    """The class ``generate.engine`` names, or why it cannot be used."""
    cls, problems = built_in_or_allowed(value, BUILT_IN, allow, "generate.engine", "engine",
                                        "a class path like my_pkg.MyEngine")
    if problems:
        return None, problems
    missing = missing_methods(cls, Engine) + ([] if getattr(cls, "name", None) else ["name"])
    if missing:
        return None, [Problem("generate.engine", f"{value} is not an engine: it lacks {', '.join(missing)}",
                              "see stages.generate.engines.Engine (name, problems, compiled, generate, tags)")]
    return cls, []


def build(settings: Any, allow: list[str]) -> tuple[Any, list[Problem]]:
    """The engine ``settings.engine`` names, built with its typed ``engine_options``; or the problems."""
    cls, problems = engine_class(settings.engine, allow)
    if cls is None:
        return None, problems
    schema, options = getattr(cls, "Config", None), dict(settings.engine_options or {})
    if schema is None:  # an engine without a Config takes no options
        problems = [Problem(f"generate.engine_options.{k}", f"engine {cls.name!r} takes no options",
                            f"remove generate.engine_options.{k}") for k in options]
        typed_options = None
    else:
        typed_options, problems = typed(schema, options, "generate.engine_options")
    return (None if problems else cls(settings, typed_options)), problems
