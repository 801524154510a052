"""Decode-step attention split along the key/value length (flash-decoding), for grouped-query models.

At batch 1 a decode step's attention is latency, not bandwidth: SDPA (cuDNN's flash kernel on H200)
gives each key/value head one thread block, which walks the whole cache alone — 11 µs a layer for an
8B Llama at 384 positions whether a rank holds 8 key/value heads or 2 (profiles in BENCHMARKS.md),
0.35 ms a token that tensor parallelism cannot divide. Here each (batch row, key/value head) is cut
into splits of the cache, one program each; a program attends its group's query heads to its split
(one matrix product for all of them: the group is the rows) and leaves a partial output with its
running max and sum; the split that finishes last (an atomic count per row and head) combines them
all, so a call is one kernel. The number of splits aims at two programs per multiprocessor, so a big
batch gets few splits and a small one many; ``tuning_for`` picks block length and warps by shape.

``decode_attention(q, k, v, mask, scale)`` is a custom op (inductor keeps it as one call, CUDA
graphs capture it): ``q`` (batch, kv_heads, group, dim) as ``gqa_decode`` packs it, ``k``/``v`` (batch,
kv_heads, length, dim), ``mask`` None, bool (True: attend) or additive float, broadcastable to
(batch, 1, 1, length). Returns (batch, kv_heads, group, dim), query head h at (h // group, h % group).
Where Triton cannot run (no Triton, a CPU tensor outside Triton's interpreter) it computes the same
attention with PyTorch ops. On a GPU, 16-bit caches multiply on tensor cores (float32 sums, as
flash attention does); float32 caches, and Triton's CPU interpreter (which the tests run), multiply
and sum in float32 without them. Without reserved counts (``reserve_counts``) a second kernel combines.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from stages import kernel_launch

PROGRAMS_PER_SM = 2
_KERNELS: list[Any] = []
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # counts a captured CUDA graph may still point at: never freed


@dataclass
class Tuning:
    """How the kernels run on a GPU (benchmarks/decode_attention_bench.py times the choices).

    ``block``: cache positions a program takes per step; ``warps``: its warps; ``dot``: the two
    products on tensor cores (``tl.dot`` in the cache's dtype, float32 sums, the group padded to 16
    rows) instead of float32 multiply-and-sum over the group's real rows; ``one_kernel``: the last
    split of a (row, head) to finish combines all of them (an atomic count), not a second kernel."""

    block: int = 64
    warps: int = 8
    dot: bool = True
    one_kernel: bool = True


TUNING: Tuning | None = None  # None: tuning_for picks by the call's shape; a Tuning: every call uses it


def tuning_for(rows: int, processors: int) -> Tuning:
    """The fastest tuning measured on H200 (BENCHMARKS.md, decode_attention_bench): tensor cores and
    one kernel always; long blocks of 8 warps while (row, head) pairs are fewer than multiprocessors
    (batch 1: 7.7–8.4 µs against SDPA's 17.7–18.9 in that benchmark), short blocks of 4 warps once
    they fill the GPU (batch 32, 8 heads: 22.4 µs against 34.9)."""
    if TUNING is not None:
        return TUNING
    return Tuning() if rows < processors else Tuning(block=32, warps=4)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def split_count(rows: int, length: int, processors: int, block: int) -> int:
    """Splits of the cache per (batch row, key/value head): enough programs to fill the GPU, no split
    shorter than one block, never more splits than blocks."""
    blocks = max(math.ceil(length / block), 1)
    wanted = math.ceil(PROGRAMS_PER_SM * processors / max(rows, 1))
    return max(1, min(blocks, wanted))


def _kernels() -> Any:
    """(split kernel, combine kernel), built on first use; None where Triton is missing."""
    if _KERNELS:
        return _KERNELS[0]
    try:
        from stages.attention.split_kv_kernels import split_kv_attend, split_kv_combine
    except ImportError:
        _KERNELS.append(None)
        return None
    _KERNELS.append((split_kv_attend, split_kv_combine))
    return _KERNELS[0]


def reserve_counts(device: torch.device, n: int = 1 << 16) -> None:
    """Per (row, head), how many splits have finished: zero between calls (the split that combines
    resets it). Made before any compile or capture (never inside the op: a CUDA graph's memory pool
    must not own it) and never freed (a captured graph keeps pointing at it). Calls with more
    (row, head) pairs than reserved combine in a second kernel. One stream at a time per device: two
    calls running at once on one GPU would count into the same slots."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < n:
        if have is not None:
            _OUTGROWN.append(have)
        _COUNTERS[device] = torch.zeros(n, dtype=torch.int32, device=device)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """The same attention in PyTorch ops, float32 inside (also the fallback)."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (batch, kv_heads, group, length)
    if mask is not None:
        m = mask.reshape(mask.shape[0], 1, 1, mask.shape[-1])
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with nothing to attend: zeros, as the kernel
    return torch.matmul(p, v.float()).to(q.dtype)


def _runs_triton(q: torch.Tensor) -> bool:
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("optipipe::split_kv_decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    kernels = _kernels() if _runs_triton(q) else None
    if kernels is None:
        return reference(q, k, v, mask, scale)
    attend, combine = kernels
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # rows are read whole
    batch, kv_heads, group, dim = q.shape
    length = k.shape[2]
    processors = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    tuning = tuning_for(batch * kv_heads, processors)
    # tensor cores for 16-bit caches on a GPU; float32 caches (tensor cores would round them to TF32)
    # and Triton's interpreter (its bf16 products are not the GPU's) take the float32 sums
    dot = tuning.dot and q.is_cuda and q.dtype != torch.float32
    splits = split_count(batch * kv_heads, length, processors, tuning.block)
    split_len = math.ceil(math.ceil(length / splits) / tuning.block) * tuning.block
    splits = math.ceil(length / split_len)
    G = max(16, _next_pow2(group)) if dot else _next_pow2(group)  # tl.dot needs 16 rows
    D = max(16, _next_pow2(dim))
    part_o = torch.empty(batch * kv_heads * splits * G * D, dtype=torch.float32, device=q.device)
    part_m = torch.empty(batch * kv_heads * splits * G, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if mask is None:
        kind, m, smb, sml = 0, q, 0, 0  # any pointer: never read
    else:
        m = mask.reshape(mask.shape[0], mask.shape[-1])  # (batch or 1, length): one query position
        kind = 1 if m.dtype == torch.bool else 2
        smb, sml = (m.stride(0) if m.shape[0] > 1 else 0), m.stride(1)
    counts = _COUNTERS.get(q.device)
    one = counts is not None and counts.numel() >= batch * kv_heads and (tuning.one_kernel or splits == 1)
    counts = counts if one else part_m  # any pointer when not one
    pdl = kernel_launch.dependent(q.device)
    attend[(batch * kv_heads, splits)](
        q, k, v, m, part_o, part_m, part_l, out, counts, scale, length, split_len, kv_heads, group, dim,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), smb, sml, out.stride(0), out.stride(1), out.stride(2),
        MASK=kind, G=G, D=D, BLOCK=tuning.block, DOT=dot, ONE=one, PDL=pdl, num_warps=tuning.warps,
        **kernel_launch.options(pdl))
    if not one:
        combine[(batch * kv_heads,)](part_o, part_m, part_l, out, splits, group, dim,
                                     out.stride(0), out.stride(1), out.stride(2), kv_heads, G=G, D=D,
                                     PDL=pdl, **kernel_launch.options(pdl))
    return out


@decode_attention.register_fake
def _(q, k, v, mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
