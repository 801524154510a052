"""Will a data-parallel replica fit one GPU? Weight bytes from the config, GPU memory from
nvidia-smi (pipeline/gpus.py)."""

from __future__ import annotations

from typing import Any, Optional

from pipeline.contract import Problem


def parameter_bytes(root: Any) -> Optional[float]:
    """Parameters × bytes per parameter of the load dtype, from the config on the meta device."""
    from stages.load.sources import architecture

    arch = architecture(root.model)
    if arch is None or root.model.task != "causal_lm":
        return None
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**arch)
        with init_empty_weights():
            n = AutoModelForCausalLM.from_config(config).num_parameters()
    except Exception:  # an architecture we cannot instantiate empty: the rule is skipped
        return None
    dtype = root.stages["load"].torch_dtype_name()
    return float(n) * (4 if dtype == "float32" else 2)


def fits_one_gpu(param_bytes: Optional[float], gpu_bytes: Optional[int]) -> Optional[Problem]:
    if param_bytes is None or gpu_bytes is None or param_bytes < 0.95 * gpu_bytes:
        return None
    return Problem("shard", f"a data-parallel replica holds every weight ({param_bytes / 2**30:.1f} GiB) "
                   f"but one GPU has {gpu_bytes / 2**30:.1f} GiB", "shard=tensor_parallel, or "
                   "shard.tp_size=2 (replicas of TP2), or quantize=int4_torchao")
