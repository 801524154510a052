"""How far a decode step is from the memory-bandwidth limit (MBU).

A decode step must read every weight once and the whole KV cache written so far; at the card's
measured copy bandwidth that sets a floor on step time. MBU = bytes a step must read ÷ step time ÷
bandwidth: 1.0 is the physical limit.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.lru_cache(maxsize=None)
def copy_bandwidth_bytes_per_s(device: str, gib: float = 1.0, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth: each copy reads and writes ``gib`` GiB."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):  # warm-up
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3
    del src, dst
    return 2 * n * repeats / seconds


def kv_cache_bytes(config: Any, batch: int, tokens: float, dtype_bytes: int) -> float:
    """Bytes of keys and values for ``tokens`` positions of ``batch`` sequences, all layers."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2.0 * config.num_hidden_layers * batch * tokens * heads * head_dim * dtype_bytes


def decode_step_bytes(weight_bytes: float, config: Any, batch: int, prompt_tokens: int,
                      new_tokens: int, dtype_bytes: int) -> float:
    """Bytes one average decode step reads: all weights + the KV cache at its mean length."""
    mean_context = prompt_tokens + new_tokens / 2
    return weight_bytes + kv_cache_bytes(config, batch, mean_context, dtype_bytes)


def mbu(step_bytes: float, step_seconds: float, bandwidth: float) -> float:
    return step_bytes / step_seconds / bandwidth
