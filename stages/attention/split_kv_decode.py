"""Decode-step attention split along the key/value length (flash-decoding), for grouped-query models.

At batch 1 a decode step's attention is latency, not bandwidth: SDPA (cuDNN's flash kernel on H200)
gives each key/value head one thread block, which walks the whole cache alone — 11 µs a layer for an
8B Llama at 384 positions whether a rank holds 8 key/value heads or 2 (profiles in BENCHMARKS.md),
0.35 ms a token that tensor parallelism cannot divide. Here each (batch row, key/value head) is cut
into splits of the cache, one program each; a program attends its group's query heads to its split
(one matrix product for all of them: the group is the rows) and leaves a partial output with its
running max and sum; a second kernel combines the splits. The number of splits aims at two programs
per multiprocessor, so a big batch gets few splits and a small one many.

``decode_attention(q, k, v, mask, scale)`` is a custom op (inductor keeps it as one call, CUDA
graphs capture it): ``q`` (batch, kv_heads, group, dim) as ``gqa_decode`` packs it, ``k``/``v`` (batch,
kv_heads, length, dim), ``mask`` None, bool (True: attend) or additive float, broadcastable to
(batch, 1, 1, length). Returns (batch, kv_heads, group, dim), query head h at (h // group, h % group).
Where Triton cannot run (no Triton, a CPU tensor outside Triton's interpreter) it computes the same
attention with PyTorch ops. Both products run in float32 (a block is at most 16 query rows by 64
positions: the arithmetic is not what a decode step waits for), which is also the one form Triton's
CPU interpreter computes correctly for bf16, so the tests run the code the GPU runs.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

BLOCK_N = 64  # cache positions per inner step of a program
PROGRAMS_PER_SM = 2
_KERNELS: list[Any] = []


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def split_count(rows: int, length: int, processors: int) -> int:
    """Splits of the cache per (batch row, key/value head): enough programs to fill the GPU, no split
    shorter than one block, never more splits than blocks."""
    blocks = max(math.ceil(length / BLOCK_N), 1)
    wanted = math.ceil(PROGRAMS_PER_SM * processors / max(rows, 1))
    return max(1, min(blocks, wanted))


def _kernels() -> Any:
    """(split kernel, combine kernel), built on first use; None where Triton is missing."""
    if _KERNELS:
        return _KERNELS[0]
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _KERNELS.append(None)
        return None

    @triton.jit
    def split_kv_attend(q_ptr, k_ptr, v_ptr, m_ptr, part_o, part_m, part_l, scale, length, split_len,
                        kv_heads, group, dim,
                        sqb, sqh, sqg, skb, skh, skl, svb, svh, svl, smb, sml,
                        MASK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        # MASK: 0 none, 1 bool (True attends), 2 additive
        bh = tl.program_id(0)
        split = tl.program_id(1)
        splits = tl.num_programs(1)
        b = bh // kv_heads
        h = bh % kv_heads
        rows = tl.arange(0, G)
        cols = tl.arange(0, D)
        q_in = (rows[:, None] < group) & (cols[None, :] < dim)
        q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqg + cols[None, :], mask=q_in, other=0.0)
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        m_i = tl.full([G], float("-inf"), tl.float32)
        l_i = tl.zeros([G], tl.float32)
        acc = tl.zeros([G, D], tl.float32)
        for n0 in range(start, end, BLOCK):
            pos = n0 + tl.arange(0, BLOCK)
            valid = pos < end
            kv_in = valid[:, None] & (cols[None, :] < dim)
            k = tl.load(k_ptr + b * skb + h * skh + pos[:, None] * skl + cols[None, :], mask=kv_in, other=0.0)
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale  # (G, BLOCK), float32; no TF32
            if MASK == 1:
                keep = tl.load(m_ptr + b * smb + pos * sml, mask=valid, other=0)
                s = tl.where(keep[None, :] != 0, s, float("-inf"))
            if MASK == 2:
                s = s + tl.load(m_ptr + b * smb + pos * sml, mask=valid, other=0.0).to(tl.float32)[None, :]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: no -inf - -inf
            alpha = tl.exp(m_i - base)
            p = tl.exp(s - base[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + b * svb + h * svh + pos[:, None] * svl + cols[None, :], mask=kv_in, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            m_i = m_new
        at = (bh * splits + split) * G + rows
        tl.store(part_m + at, m_i)
        tl.store(part_l + at, l_i)
        tl.store(part_o + at[:, None] * D + cols[None, :], acc)

    @triton.jit
    def split_kv_combine(part_o, part_m, part_l, out_ptr, splits, group, dim, sob, soh, sog, kv_heads,
                         G: tl.constexpr, D: tl.constexpr):
        bh = tl.program_id(0)
        b = bh // kv_heads
        h = bh % kv_heads
        rows = tl.arange(0, G)
        cols = tl.arange(0, D)
        top = tl.full([G], float("-inf"), tl.float32)
        for s in range(0, splits):
            top = tl.maximum(top, tl.load(part_m + (bh * splits + s) * G + rows))
        base = tl.where(top == float("-inf"), 0.0, top)
        den = tl.zeros([G], tl.float32)
        acc = tl.zeros([G, D], tl.float32)
        for s in range(0, splits):
            at = (bh * splits + s) * G + rows
            w = tl.exp(tl.load(part_m + at) - base)
            den += w * tl.load(part_l + at)
            acc += w[:, None] * tl.load(part_o + at[:, None] * D + cols[None, :])
        out = acc / tl.where(den == 0.0, 1.0, den)[:, None]  # a row with nothing to attend: zeros
        inside = (rows[:, None] < group) & (cols[None, :] < dim)
        tl.store(out_ptr + b * sob + h * soh + rows[:, None] * sog + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=inside)

    _KERNELS.append((split_kv_attend, split_kv_combine))
    return _KERNELS[0]


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
    splits = split_count(batch * kv_heads, length, processors)
    split_len = math.ceil(math.ceil(length / splits) / BLOCK_N) * BLOCK_N
    splits = math.ceil(length / split_len)
    G, D = max(16, _next_pow2(group)), max(16, _next_pow2(dim))  # tl.dot needs 16 rows and columns
    part_o = torch.empty(batch * kv_heads * splits * G * D, dtype=torch.float32, device=q.device)
    part_m = torch.empty(batch * kv_heads * splits * G, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    if mask is None:
        kind, m, smb, sml = 0, q, 0, 0  # any pointer: never read
    else:
        m = mask.reshape(mask.shape[0], mask.shape[-1])  # (batch or 1, length): one query position
        kind = 1 if m.dtype == torch.bool else 2
        smb, sml = (m.stride(0) if m.shape[0] > 1 else 0), m.stride(1)
    attend[(batch * kv_heads, splits)](
        q, k, v, m, part_o, part_m, part_l, scale, length, split_len, kv_heads, group, dim,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), smb, sml, MASK=kind, G=G, D=D, BLOCK=BLOCK_N)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    combine[(batch * kv_heads,)](part_o, part_m, part_l, out, splits, group, dim,
                                 out.stride(0), out.stride(1), out.stride(2), kv_heads, G=G, D=D)
    return out


@decode_attention.register_fake
def _(q, k, v, mask, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
