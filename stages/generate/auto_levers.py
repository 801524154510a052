"""What the fast engine's unset levers become: ``generate.fast_decode_attention=auto`` and
``generate.fast_pdl`` unset (null).

Both levers were measured to win where a decode step is short and many of its kernels are small:
tensor parallel. On one 4 × H200 host TP4 at batch 1 decoded 1.09× faster with our split
decode-attention kernel, and 1.05× faster again with programmatic dependent launch; the GPU test
gave TP2 and TP4 the one-GPU text through both (BENCHMARKS.md). On one GPU neither is shown to win
(split_kv gained nothing at batch 1; PDL is not measured there), so there they stay off unless set.
A value the user set is always kept; the tag ``generate.levers`` says what ran and why.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from pipeline import measure
from stages import kernel_launch
from stages.attention.gqa_decode import SDPA, SPLIT_KV
from stages.shard.tp_layers import holds_shards

AUTO = "auto"


@dataclass(frozen=True)
class Levers:
    decode_attention: str  # sdpa | split_kv
    pdl: bool
    why: str  # for the run's tags: which were chosen here, and the reason


def decide(kernel: str, pdl: bool | None, tensor_parallel: bool, split_kv_ok: bool, pdl_ok: bool) -> Levers:
    """The levers from the settings (``kernel`` may be ``auto``, ``pdl`` None) and what this run is:
    our tensor-parallel layers or not, and whether each lever can run here (GPU, Triton, torch)."""
    chosen = []
    if kernel == AUTO:
        kernel = SPLIT_KV if tensor_parallel and split_kv_ok else SDPA
        chosen.append(f"decode attention {kernel}")
    if pdl is None:
        pdl = tensor_parallel and pdl_ok
        chosen.append("programmatic dependent launch" if pdl else "stream-order launch")
    if not chosen:
        return Levers(kernel, pdl, "as set")
    reason = "tensor-parallel layers" if tensor_parallel else "one process"
    if tensor_parallel and not (split_kv_ok and pdl_ok):
        reason += " (a lever that cannot run here stays off: it needs a CUDA GPU, Triton, compute capability 9.0)"
    return Levers(kernel, pdl, f"{', '.join(chosen)}: {reason}")


def for_model(model: Any, settings: Any) -> Levers:
    """``decide`` for ``model`` as it is now (sharded or not, on its device) and ``settings`` (generate's)."""
    device = measure.parameter_device(model)
    cuda = device.type == "cuda"
    split_kv_ok = cuda and settings.fast_gqa_attention and importlib.util.find_spec("triton") is not None
    return decide(settings.fast_decode_attention, settings.fast_pdl, holds_shards(model), split_kv_ok,
                  settings.fast_compile_mode is not None and kernel_launch.capable(device) and inductor_has_pdl())


def inductor_has_pdl() -> bool:
    """Whether this torch's inductor can emit programmatic dependent launches."""
    from torch._inductor import config as inductor_config

    return hasattr(inductor_config.triton, "enable_pdl")
