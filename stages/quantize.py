"""quantize stage: weight quantization chosen in YAML, applied inside the one load, verified after.

bitsandbytes quantizes inside ``from_pretrained`` (``quantization_config``); afterwards we count
which Linear layers really became 8-bit / 4-bit modules and how many bytes the weights take, and
fail the run if a requested quantization quantized nothing.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from pipeline import measure
from pipeline.contract import (BaseStage, LoadPlan, NoSettings, Problem, RunContext, StageError,
                               StageResult, warning)

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


class NoQuantize(BaseStage):
    """Weights stay in the load dtype; reports what a quantizer would have had to work with."""

    name: ClassVar[str] = "quantize"
    Config: ClassVar[type] = NoSettings

    def apply(self, ctx: RunContext) -> StageResult:
        n = count_linear(ctx.model)
        return StageResult(metrics={"linear_layers": float(n), "quantized_layers": 0.0},
                           tags={"quantize.method": "none"}, summary=f"none ({n} Linear layers)")


@dataclass
class BitsAndBytesSettings:
    bits: int = 4  # 4 (nf4 / fp4) | 8 (LLM.int8)
    quant_type: str = "nf4"  # 4-bit only: nf4 | fp4
    compute_dtype: str = "bfloat16"  # 4-bit matmul dtype; transformers' silent default is float32
    double_quant: bool = False  # 4-bit: quantize the quantization constants too (~0.4 bit/param)
    quant_storage: str = "uint8"  # 4-bit: dtype that packs the weights (bfloat16 for FSDP-style sharding)
    threshold: float = 6.0  # 8-bit: outlier threshold of LLM.int8
    skip_modules: Optional[list[str]] = None  # modules left unquantized (default: the output head)
    cpu_offload: bool = False  # 8-bit: allow fp32 modules on CPU (llm_int8_enable_fp32_cpu_offload)
    extra: dict[str, Any] = field(default_factory=dict)  # any other BitsAndBytesConfig argument


class BitsAndBytes(BaseStage):
    name: ClassVar[str] = "quantize"
    Config: ClassVar[type] = BitsAndBytesSettings

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
        before = dense_bytes(model, DTYPE_BYTES.get(unquantized_dtype, 2))
        after = float(measure.weight_bytes(model))
        tags = {"quantize.method": self.method(), "quantize.modules": str(counts)}
        if self.cfg.bits == 4 and self.cfg.compute_dtype != unquantized_dtype:
            tags["quantize.warning"] = (f"4-bit compute dtype {self.cfg.compute_dtype} differs from "
                                        f"the model's {unquantized_dtype}: activations are cast at "
                                        f"every quantized layer")
        return StageResult(
            metrics={"quantized_layers": float(quantized), "unquantized_linear_layers": float(left),
                     "dense_weight_bytes": before, "weight_bytes": after, "compression": before / after},
            tags=tags,
            summary=f"bitsandbytes {self.method()}: {quantized} layers quantized, {left} left, "
                    f"{before / 2**30:.2f} → {after / 2**30:.2f} GiB")

    def describe(self) -> str:
        return f"BitsAndBytes({self.method()})"
