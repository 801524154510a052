"""quantize stage: weight quantization chosen in YAML, applied inside the one load, verified after.

bitsandbytes quantizes inside ``from_pretrained`` (``quantization_config``); afterwards we count
which Linear layers really became 8-bit / 4-bit modules and how many bytes the weights take, and
fail the run if a requested quantization quantized nothing.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, ClassVar

import torch
from torch.distributed.tensor import DTensor

from pipeline import gpus, measure
from pipeline.contract import (WORST, BaseStage, LoadPlan, NoSettings, Problem, QuantizeTraits, RunContext,
                               StageError, StageResult, across, warning, weight_split)
from stages import float8_rows
from stages.settings import BitsAndBytesSettings, Float8RowsSettings, TorchAoSettings

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def count_linear(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


def quantized_modules(model: torch.nn.Module) -> dict[str, int]:
    """Module class name → count, for the bitsandbytes layer classes present in ``model``."""
    counts: dict[str, int] = {}
    for m in model.modules():
        name = type(m).__name__
        if type(m).__module__.startswith("bitsandbytes"):
            counts[name] = counts.get(name, 0) + 1
    return counts


def dense_bytes(model: torch.nn.Module, dtype_bytes: int) -> float:
    """What the weights would take unquantized: every parameter at ``dtype_bytes``."""
    return float(model.num_parameters()) * dtype_bytes


SIZES_ACROSS_RANKS = across(WORST, ["dense_weight_bytes", "weight_bytes"])  # the largest shard bounds the run


def size_metrics(model: torch.nn.Module, quantized: int, left: int, dense_dtype: str) -> dict[str, float]:
    """Layers quantized and left, and the weights' bytes before (every parameter dense) and after."""
    before = dense_bytes(model, DTYPE_BYTES.get(dense_dtype, 2))
    after = float(measure.weight_bytes(model))
    return {"quantized_layers": float(quantized), "unquantized_linear_layers": float(left),
            "dense_weight_bytes": before, "weight_bytes": after, "compression": before / after}


class NoQuantize(BaseStage):
    """Weights stay in the load dtype; reports what a quantizer would have had to work with."""

    name: ClassVar[str] = "quantize"
    Config: ClassVar[type] = NoSettings
    traits: ClassVar[QuantizeTraits] = QuantizeTraits()

    def apply(self, ctx: RunContext) -> StageResult:
        n = count_linear(ctx.model)
        return StageResult(metrics={"linear_layers": float(n), "quantized_layers": 0.0},
                           tags={"quantize.method": "none"}, summary=f"none ({n} Linear layers)")


class BitsAndBytes(BaseStage):
    name: ClassVar[str] = "quantize"
    Config: ClassVar[type] = BitsAndBytesSettings
    # packed weights that are not DTensors, and kernels torch.compile cannot trace
    traits: ClassVar[QuantizeTraits] = QuantizeTraits(quantizes=True, compileable=False, tp_shardable=False,
                                                      joinable=False, kernel="bitsandbytes")

    def problems(self, root: Any) -> list[Problem]:
        c, out = self.cfg, []
        if importlib.util.find_spec("bitsandbytes") is None:
            out.append(Problem("quantize", "bitsandbytes is not installed",
                               "pip install bitsandbytes (or quantize=none)"))
        if c.bits not in (4, 8):
            out.append(Problem("quantize.bits", f"bitsandbytes does {4} or {8} bits, not {c.bits}",
                               "quantize=nf4 / quantize=int8"))
        if c.bits == 4 and c.quant_type not in ("nf4", "fp4"):
            out.append(Problem("quantize.quant_type", f"unknown 4-bit type {c.quant_type!r}",
                               "quantize.quant_type=nf4|fp4"))
        for key in ("compute_dtype", "quant_storage"):
            value = getattr(c, key)
            if not isinstance(getattr(torch, value, None), torch.dtype):
                out.append(Problem(f"quantize.{key}", f"{value!r} is not a torch dtype",
                                   f"quantize.{key}=bfloat16"))
        out += self._device_rules(root)
        load_dtype = root.stages["load"].cfg.dtype
        if c.bits == 4 and load_dtype not in ("auto", c.compute_dtype):
            out.append(warning("quantize.compute_dtype", f"4-bit matmuls run in {c.compute_dtype} "
                               f"while the rest of the model is {load_dtype}: activations are cast "
                               "at every quantized layer", f"quantize.compute_dtype={load_dtype}"))
        return out

    def _device_rules(self, root: Any) -> list[Problem]:
        device = root.stages["load"].device()
        if self.cfg.bits == 8 and device.startswith("cuda") and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(torch.device(device))
            if (major, minor) < (7, 5):
                return [Problem("quantize", f"LLM.int8 needs a GPU of compute capability ≥ 7.5; "
                                f"{device} is {major}.{minor}", "quantize=nf4, or load.device=cpu")]
        return []

    def quantization_config(self):
        from transformers import BitsAndBytesConfig

        c = self.cfg
        if c.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=c.threshold,
                                      llm_int8_skip_modules=c.skip_modules,
                                      llm_int8_enable_fp32_cpu_offload=c.cpu_offload, **c.extra)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=c.quant_type,
                                  bnb_4bit_compute_dtype=getattr(torch, c.compute_dtype),
                                  bnb_4bit_use_double_quant=c.double_quant,
                                  bnb_4bit_quant_storage=getattr(torch, c.quant_storage),
                                  llm_int8_skip_modules=c.skip_modules, **c.extra)

    def plan(self, plan: LoadPlan) -> None:
        plan.set(self.name, "quantization_config", self.quantization_config())

    def method(self) -> str:
        c = self.cfg
        return "int8" if c.bits == 8 else c.quant_type + ("_double" if c.double_quant else "")

    def apply(self, ctx: RunContext) -> StageResult:
        model = ctx.model
        counts = quantized_modules(model)
        quantized = sum(counts.values())
        left = count_linear(model) - sum(n for cls, n in counts.items() if cls.startswith("Linear"))
        if quantized == 0:
            raise StageError(self.name, f"asked for bitsandbytes {self.method()} but no layer was "
                             "quantized", "check quantize.skip_modules, or use quantize=none")
        unquantized_dtype = str(next(p.dtype for p in model.parameters()
                                     if p.dtype.is_floating_point)).removeprefix("torch.")
        sizes = size_metrics(model, quantized, left, unquantized_dtype)
        before, after = sizes["dense_weight_bytes"], sizes["weight_bytes"]
        tags = {"quantize.method": self.method(), "quantize.modules": str(counts)}
        if self.cfg.bits == 4 and self.cfg.compute_dtype != unquantized_dtype:
            tags["quantize.warning"] = (f"4-bit compute dtype {self.cfg.compute_dtype} differs from "
                                        f"the model's {unquantized_dtype}: activations are cast at "
                                        f"every quantized layer")
        return StageResult(
            metrics=sizes, tags=tags, across_ranks=SIZES_ACROSS_RANKS,
            summary=f"bitsandbytes {self.method()}: {quantized} layers quantized, {left} left, "
                    f"{before / 2**30:.2f} → {after / 2**30:.2f} GiB")

    def describe(self) -> str:
        return f"BitsAndBytes({self.method()})"


TORCHAO_GROUPS = (32, 64, 128, 256)


def linear_input_sizes(spec: Any, split: int = 1) -> list[int]:
    """Hidden and intermediate sizes of the model (the Linear inputs an int4 group must tile); with
    weights split over ``split`` ranks as they load, also each rank's share of them (the row-parallel
    layers' inputs, o_proj's and down_proj's, which torchao quantizes slice by slice)."""
    from stages.load.sources import architecture

    arch = architecture(spec) or {}
    whole = [arch[k] for k in ("hidden_size", "intermediate_size") if isinstance(arch.get(k), int)]
    return whole + ([n // split for n in whole] if split > 1 else [])


TORCHAO_WEIGHTS = ("int4", "int8", "fp8")
# what each weight format does with the activations: int4/int8 are weight-only kernels; fp8 quantizes
# them too (dynamic). Weight-only float8 is quantize=fp8_weight_only (Float8WeightOnly below): torchao's
# own dequantized whole weights before some matmuls in the compiled step (stages/float8_rows.py says
# by how much).
TORCHAO_ACTIVATIONS = {"int4": ("none",), "int8": ("none",), "fp8": ("dynamic",)}
FP8_MIN_CAPABILITY = 8.9  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
# the class torchao makes each int4 weight on each device: how apply checks the kernel named is the one that runs
INT4_WEIGHT_CLASS = {"tinygemm": "Int4TilePackedTo4dTensor", "cpu": "IntxUnpackedToInt8Tensor"}


def int4_kernel(device: str) -> tuple[str, str]:
    """(the int4 kernel a job runs, what it is), for the run's tags."""
    if device.startswith("cuda"):
        return "tinygemm", "torchao's int4 CUDA kernel, made for one activation row"
    return "cpu", "a CPU has no int4 matmul: the int4 grid is stored as int8, for quality measurements"


def fp8_problems(device: str, capabilities: Callable[[], list[float] | None]) -> list[Problem]:
    """fp8 needs CUDA GPUs of compute capability ≥ 8.9; ``capabilities`` (each visible GPU's, read
    without initialising CUDA) is asked only for a CUDA job; None: unknown, left to torchao's check."""
    if not device.startswith("cuda"):
        return [Problem("quantize", f"fp8 matmuls need a GPU of compute capability ≥ {FP8_MIN_CAPABILITY} "
                        f"(H100, H200, L4, RTX 4090…); this job runs on {device}",
                        "quantize=fp8_weight_only (float8 weights, bf16 matmuls: runs on a CPU too), or "
                        "load.device=cuda on such a GPU")]
    caps = capabilities()
    if caps and min(caps) < FP8_MIN_CAPABILITY:
        return [Problem("quantize", f"fp8 matmuls need compute capability ≥ {FP8_MIN_CAPABILITY}; this "
                        f"host's GPUs have {', '.join(map(str, caps))}",
                        "quantize=fp8_weight_only, quantize=int8_torchao or quantize=int4_torchao")]
    return []


class TorchAo(BaseStage):
    """torchao quantization, compileable — so it composes with convert=compile / generate=fast, which
    bitsandbytes cannot. int4 and int8 are weight-only (dequantized inside the matmul); fp8 scales
    weights per output row, scales each activation row as it comes and multiplies on FP8 tensor cores.

    int4 on CUDA uses the tinygemm layout (``tile_packed_to_4d``, bf16 activations); on CPU torchao
    has no int4 matmul, so the same group-wise int4 grid is stored as int8 (``IntxWeightOnly``):
    identical numerics, for quality measurements, without the speed. fp8 runs on GPUs of compute
    capability 8.9 and above only (torchao refuses others), so the rules refuse the rest before load.
    """

    name: ClassVar[str] = "quantize"
    Config: ClassVar[type] = TorchAoSettings
    traits: ClassVar[QuantizeTraits] = QuantizeTraits(quantizes=True, joinable=False, kernel="torchao")

    def problems(self, root: Any) -> list[Problem]:
        c, out = self.cfg, []
        if importlib.util.find_spec("torchao") is None:
            out.append(Problem("quantize", "torchao is not installed",
                               "pip install 'optipipe[quantize]' (or quantize=none)"))
        if c.weights not in TORCHAO_WEIGHTS:
            out.append(Problem("quantize.weights", f"torchao quantizes weights to {', '.join(TORCHAO_WEIGHTS)}, "
                               f"not {c.weights!r}", "quantize=int4_torchao / int8_torchao / fp8"))
        if c.weights == "int4" and c.group_size is not None and c.group_size not in TORCHAO_GROUPS:
            out.append(Problem("quantize.group_size", f"group size {c.group_size} is not one of "
                               f"{TORCHAO_GROUPS}", "quantize.group_size=128"))
        allowed = TORCHAO_ACTIVATIONS.get(c.weights, ("none",))
        if c.activations not in allowed:
            out.append(Problem("quantize.activations", f"torchao {c.weights} takes activations "
                               f"{' or '.join(allowed)}, not {c.activations!r}",
                               f"quantize.activations={allowed[0]}" + (" (or quantize=fp8)" if c.weights != "fp8"
                                                                        else " (or quantize=fp8_weight_only)")))
        out += self._shape_rules(root)
        dynamic_fp8 = c.weights == "fp8" and c.activations == "dynamic"
        load = root.stages["load"]
        tinygemm = c.weights == "int4" and int4_kernel(load.device())[0] == "tinygemm"
        # tinygemm takes bfloat16 activations; fp8's row-wise scaled matmul returns them
        if (tinygemm or dynamic_fp8) and load.device().startswith("cuda") and load.torch_dtype_name() != "bfloat16":
            kernel = "int4 CUDA kernel (tinygemm)" if tinygemm else "fp8 row-wise scaled matmul"
            out.append(Problem("load.dtype", f"torchao's {kernel} takes bfloat16 activations; the model loads "
                               f"as {load.torch_dtype_name()}", "load.dtype=bfloat16"))
        batch = getattr(root.stages["generate"].cfg, "batch_size", 1)
        if tinygemm and batch > 1:
            # tinygemm multiplies one activation row at a time well, many badly (BENCHMARKS.md, one GPU)
            out.append(warning("quantize", f"int4 on CUDA runs tinygemm, made for one row: on H200s it decoded "
                               f"1.01–1.38× bf16 at batch 1 but 0.31–0.44× at batch 32, with a 2 s TTFT "
                               f"(batch {batch} asked; sizes between unmeasured)",
                               "generate.batch_size=1, or quantize=int8_torchao / quantize=none for batches"))
        if dynamic_fp8:
            out += fp8_problems(load.device(), gpus.compute_capabilities)
        if c.weights == "fp8" and c.include_embeddings:  # a lookup has no matmul to run in float8
            out.append(Problem("quantize.include_embeddings", "fp8 quantizes the Linear layers only",
                               "quantize.include_embeddings=false"))
        return out

    def _shape_rules(self, root: Any) -> list[Problem]:
        """int4 groups must tile every Linear input: hidden and intermediate sizes (when readable)."""
        if self.cfg.weights != "int4" or self.cfg.group_size not in TORCHAO_GROUPS + (None,):
            return []
        split = weight_split(root)
        sizes = linear_input_sizes(root.model, split)
        fits = [g for g in TORCHAO_GROUPS if all(n % g == 0 for n in sizes)]
        if self.cfg.group_size is None and fits or self.cfg.group_size in fits:
            return []
        shares = f" (with each of {split} tensor-parallel ranks' share)" if split > 1 else ""
        return [Problem("quantize.group_size", f"group size {self.cfg.group_size or 'auto'} does not "
                        f"divide the model's Linear input sizes {sizes}{shares}",
                        f"quantize.group_size={max(fits)}" if fits else "quantize=int8_torchao")]

    def group_size(self, spec: Any, split: int = 1) -> int:
        """The configured group size, or the largest that tiles this model's Linear inputs (each
        rank's share of them when the weights load split over ``split`` ranks)."""
        if self.cfg.group_size is not None:
            return self.cfg.group_size
        sizes = linear_input_sizes(spec, split)
        return next((g for g in (128, 64, 32) if all(n % g == 0 for n in sizes)), 32)

    def torchao_config(self, device: str, group_size: int):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

        if self.cfg.weights == "int8":
            return Int8WeightOnlyConfig()
        if self.cfg.weights == "fp8":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

            # per-row scales (the weights', and each activation row's): finer than one scale per
            # tensor, and what the FP8 row-wise scaled matmul takes
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        if int4_kernel(device)[0] == "tinygemm":
            return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
        from torchao.quantization import IntxWeightOnlyConfig, PerGroup
        from torchao.quantization.quant_primitives import MappingType

        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
                                    mapping_type=MappingType.ASYMMETRIC)

    def plan(self, plan: LoadPlan) -> None:
        from transformers import TorchAoConfig

        self.chosen_group = self.group_size(plan.model, plan.weight_split) if self.cfg.weights == "int4" else None
        self.chosen_kernel = int4_kernel(plan.device) if self.cfg.weights == "int4" else None
        config = TorchAoConfig(self.torchao_config(plan.device, self.chosen_group),
                               include_input_output_embeddings=self.cfg.include_embeddings,
                               untie_embedding_weights=self.cfg.include_embeddings)
        plan.set(self.name, "quantization_config", config)

    def apply(self, ctx: RunContext) -> StageResult:
        model = ctx.model
        kinds: dict[str, int] = {}
        for m in model.modules():
            w = getattr(m, "weight", None)
            w = w.to_local() if isinstance(w, DTensor) else w  # a rank's shard (tensor parallel at load)
            if isinstance(m, torch.nn.Linear) and w is not None and measure.is_wrapper(w):
                kinds[type(w).__name__] = kinds.get(type(w).__name__, 0) + 1
        quantized = sum(kinds.values())
        if quantized == 0:
            raise StageError(self.name, f"asked for torchao {self.cfg.weights} but no Linear weight "
                             "was quantized", "quantize=none, or check the model's Linear shapes")
        kernel = getattr(self, "chosen_kernel", None)
        if kernel and set(kinds) != {INT4_WEIGHT_CLASS[kernel[0]]}:
            raise StageError(self.name, f"int4 for {kernel[0]} should have made every quantized weight a "
                             f"{INT4_WEIGHT_CLASS[kernel[0]]}; torchao made {kinds}",
                             "quantize=int8_torchao, or pin torchao to the version in pyproject.toml")
        dtype = next(p.dtype for p in model.parameters() if not measure.is_wrapper(p))
        left = count_linear(model) - quantized
        sizes = size_metrics(model, quantized, left, str(dtype).removeprefix("torch."))
        before, after = sizes["dense_weight_bytes"], sizes["weight_bytes"]
        return StageResult(
            metrics=sizes, across_ranks=SIZES_ACROSS_RANKS,
            tags={"quantize.method": f"torchao_{self.cfg.weights}", "quantize.format": str(kinds),
                  "quantize.activations": self.cfg.activations,
                  "quantize.group_size": str(getattr(self, "chosen_group", None)),
                  **({"quantize.int4_kernel": f"{kernel[0]} ({kernel[1]})"} if kernel else {})},
            summary=f"torchao {self.cfg.weights} {self.activation_words()}: {quantized} layers "
                    f"({', '.join(kinds)}), {left} left, {before / 2**30:.2f} → {after / 2**30:.2f} GiB")

    def activation_words(self) -> str:
        return "weights + dynamic activations" if self.cfg.activations == "dynamic" else "weight-only"

    def describe(self) -> str:
        return f"TorchAo({self.cfg.weights}, {self.activation_words()})"


class Float8WeightOnly(BaseStage):
    """float8 (e4m3) weights, one float32 scale per output row, activations left in the model's dtype:
    our own plain-tensor layers (stages/float8_rows.py), converted after the load. In the compiled
    decode step of ``generate=fast`` a one-row matmul reads each weight as one byte, fused with its
    dequantization; the joined q/k/v and gate/up projections join these weights too. Runs anywhere
    (a CPU included), so its quality can be measured without a float8 GPU."""

    name: ClassVar[str] = "quantize"
    Config: ClassVar[type] = Float8RowsSettings
    # plain tensors: compiled and joined like dense ones; not DTensors, so no tensor-parallel plan
    traits: ClassVar[QuantizeTraits] = QuantizeTraits(quantizes=True, tp_shardable=False, kernel="float8 rows")

    def problems(self, root: Any) -> list[Problem]:
        generate = root.stages["generate"].cfg
        engine, compiled = getattr(generate, "engine", None), getattr(generate, "fast_compile_mode", None)
        batch = getattr(generate, "batch_size", 1)
        if not root.stages["load"].device().startswith("cuda"):
            return []
        if not (engine == "fast" and compiled):
            # eager, every matmul converts its whole weight to the activation dtype first
            return [warning("quantize", "float8 rows are fast only in the compiled decode step of "
                            "generate=fast; here every matmul first converts its whole weight",
                            "generate=fast (or quantize=none)")]
        if batch > 1:  # several rows: a dense matmul after converting the weight (BENCHMARKS.md, one GPU)
            return [warning("quantize", f"float8 rows read one byte per weight in one-row matmuls only: on an "
                            f"H200 they decoded 1.20× bf16 at batch 1 but 0.48× at batch 32 (batch {batch} "
                            "asked; sizes between unmeasured)",
                            "generate.batch_size=1, or quantize=fp8 / quantize=none for batches")]
        return []

    def apply(self, ctx: RunContext) -> StageResult:
        model = ctx.model
        dense = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        head = self.head_state(model)
        quantized = float8_rows.convert(model, include_head=head == "float8")
        if quantized == 0:
            raise StageError(self.name, "asked for float8 weights but the model has no torch.nn.Linear layer",
                             "quantize=none")
        left = count_linear(model)
        sizes = size_metrics(model, quantized, left, dense)
        before, after = sizes["dense_weight_bytes"], sizes["weight_bytes"]
        return StageResult(
            metrics=sizes, across_ranks=SIZES_ACROSS_RANKS,
            tags={"quantize.method": "float8_rows", "quantize.format": f"{{'Float8RowsLinear': {quantized}}}",
                  "quantize.activations": "none", "quantize.head": head},
            summary=f"float8 rows, weight-only: {quantized} layers, {left} left (head: {head}), "
                    f"{before / 2**30:.2f} → {after / 2**30:.2f} GiB")

    def head_state(self, model: Any) -> str:
        """float8, or why the output head stays dense."""
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if not isinstance(head, torch.nn.Linear):
            return "absent"
        if not self.cfg.include_head:
            return "dense: quantize.include_head=false"
        if embedding is not None and head.weight is embedding.weight:
            return "dense: tied to the input embedding"
        return "float8"

    def describe(self) -> str:
        return "Float8WeightOnly(float8 rows, weight-only)"
