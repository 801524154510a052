"""Clocks and memory readings that are honest on CPU and on one or many CUDA devices."""

from __future__ import annotations

import resource
import sys
import time
from typing import Iterable

import psutil
import torch

GIB = 1024**3


def cuda_devices_in_use(model: torch.nn.Module | None = None) -> list[int]:
    """CUDA device indices holding the model's parameters (all visible devices if unknown)."""
    if not torch.cuda.is_available():
        return []
    if model is None:
        return list(range(torch.cuda.device_count()))
    found = {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    return sorted(found)


def parameter_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the first device of an accelerate placement (disk and meta mean CPU)."""
    placement = getattr(model, "hf_device_map", None)
    if placement and len(set(placement.values())) > 1:
        first = next(iter(placement.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        return torch.device(first if str(first).startswith("cuda") else "cpu")
    return model.device


def synchronize(devices: Iterable[int]) -> None:
    """Wait for every device in use: a clock read before this measures launch, not work."""
    for d in devices:
        torch.cuda.synchronize(d)


def now(devices: Iterable[int] = ()) -> float:
    synchronize(devices)
    return time.perf_counter()


def reset_peaks(devices: Iterable[int]) -> None:
    for d in devices:
        torch.cuda.reset_peak_memory_stats(d)


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / GIB


def peak_rss_gib() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (GIB if sys.platform == "darwin" else 1024**2)


def memory_now(devices: Iterable[int]) -> dict[str, float]:
    devices = list(devices)
    if not devices:
        return {"rss_gib": rss_gib()}
    out = {f"cuda{d}_allocated_gib": torch.cuda.memory_allocated(d) / GIB for d in devices}
    out["allocated_gib"] = sum(out.values())
    return out


def memory_peaks(devices: Iterable[int]) -> dict[str, float]:
    """Peak allocated and reserved memory per CUDA device, or the process's peak RSS on CPU."""
    devices = list(devices)
    if not devices:
        # ru_maxrss is the lifetime peak of the process: in a --multirun sweep (one process)
        # it carries over from earlier jobs, so the current RSS is logged beside it.
        return {"peak_rss_gib": peak_rss_gib(), "rss_gib": rss_gib()}
    out: dict[str, float] = {}
    for d in devices:
        out[f"cuda{d}_peak_allocated_gib"] = torch.cuda.max_memory_allocated(d) / GIB
        out[f"cuda{d}_peak_reserved_gib"] = torch.cuda.max_memory_reserved(d) / GIB
    out["peak_allocated_gib"] = max(out[f"cuda{d}_peak_allocated_gib"] for d in devices)
    out["peak_reserved_gib"] = max(out[f"cuda{d}_peak_reserved_gib"] for d in devices)
    return out


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes a decode step reads: all but an input embedding of its own (a lookup reads a
    few rows of it, not the whole table; one tied to the output head is read whole by the head)."""
    total = weight_bytes(model)
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(embed, "weight", None)
    if weight is None or (head is not None and getattr(head, "weight", None) is weight):
        return total
    return total - stored_bytes(weight)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as stored (packed 4-bit weights with their scales)."""
    tensors = list(model.parameters()) + list(model.buffers())
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = id(t) if is_wrapper(t) else t.data_ptr()
        if key in seen and t.device.type != "meta":  # tied weights count once
            continue
        seen.add(key)
        total += stored_bytes(t) + _quant_state_bytes(t)
    return total


def is_wrapper(t: torch.Tensor) -> bool:
    """A tensor subclass holding other tensors (torchao's quantized weights): no storage of its own."""
    return hasattr(type(t), "__tensor_flatten__")


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes as stored: a wrapper counts its inner tensors (int4 data + scales), not its dtype."""
    if not is_wrapper(t):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()  # a DTensor holds this rank's shard: its bytes are what we read
    inner = (getattr(t, n) for n in names)
    return sum(stored_bytes(x) for x in inner if isinstance(x, torch.Tensor))


def _quant_state_bytes(t: torch.Tensor) -> int:
    """bitsandbytes 4-bit weights keep their scales (absmax, nested for double quantization)
    beside the packed tensor, not as parameters: count them, as they are read every matmul."""
    state = getattr(t, "quant_state", None)
    if state is None or not hasattr(state, "as_dict"):
        return 0
    return sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values()
               if isinstance(v, torch.Tensor))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
