"""Runs the split decode-attention kernels (stages/attention/split_kv_decode.py) in Triton's
interpreter on a CPU against the same attention in PyTorch ops, over shapes that exercise several
splits, a last block cut short, padded group rows and head sizes, strided caches and every mask kind.

    TRITON_INTERPRET=1 python split_kv_interpreted.py      (exit 0: all checks passed)
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from stages.attention import split_kv_decode as S  # noqa: E402

# (batch, kv_heads, group, dim, length)
SHAPES = [(1, 2, 4, 128, 384), (1, 8, 4, 64, 1), (3, 2, 8, 80, 200), (2, 1, 1, 64, 130), (1, 2, 16, 32, 65)]


def masks(batch: int, length: int, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    keep = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    keep[..., length // 2 + 1:] = False  # unfilled cache slots
    if batch > 1:
        keep[1, ..., : length // 4] = False  # a left-padded row
    additive = torch.zeros(batch, 1, 1, length, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    return {"none": None, "bool": keep, "additive": additive, "one row for all": keep[:1]}


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1" and S._kernels() is not None
    torch.manual_seed(0)
    S.reserve_counts(torch.device("cpu"), 64)
    checked = 0
    # both ways to combine the splits: in the split that finishes last, and by a second kernel
    for tuning, dtype, tol in ((S.Tuning(block=32, one_kernel=True), torch.float32, 1e-5),
                               (S.Tuning(block=32, one_kernel=True), torch.bfloat16, 2e-2),
                               (S.Tuning(block=64, one_kernel=False, warps=8), torch.float32, 1e-5),
                               (S.Tuning(block=16, one_kernel=False, warps=2), torch.bfloat16, 2e-2)):
        S.TUNING = tuning
        for batch, kv_heads, group, dim, length in SHAPES:
            q = torch.randn(batch, kv_heads, group, dim, dtype=dtype)
            # the cache as (batch, length, heads, dim) seen through a transpose: strided, rows contiguous
            k = torch.randn(batch, length, kv_heads, dim, dtype=dtype).transpose(1, 2)
            v = torch.randn(batch, length, kv_heads, dim, dtype=dtype).transpose(1, 2)
            for name, mask in masks(batch, length, dtype).items():
                got = S.decode_attention(q, k, v, mask, 0.125)
                want = S.reference(q, k, v, mask, 0.125)
                err = (got.float() - want.float()).abs().max().item()
                assert got.shape == q.shape and got.dtype == dtype, (got.shape, got.dtype)
                assert err <= tol, f"{tuning} {dtype} {(batch, kv_heads, group, dim, length)} mask {name}: error {err}"
                checked += 1
    S.TUNING = None  # the shape picks the tuning; more (row, head) pairs than reserved counts: two kernels
    for batch in (1, 40):
        q, k = torch.randn(batch, 2, 4, 64), torch.randn(batch, 2, 300, 64)
        assert (S.decode_attention(q, k, k, None, 0.1) - S.reference(q, k, k, None, 0.1)).abs().max() < 1e-5
    assert S.tuning_for(8, 132).block == 64 and S.tuning_for(256, 132).block == 32
    assert S.split_count(rows=2, length=384, processors=132, block=64) == 6
    assert S.split_count(rows=256, length=384, processors=132, block=64) == 2
    assert not S._COUNTERS[torch.device("cpu")].any()  # the last split of each call reset its count
    # a row with nothing to attend gives zeros, not NaN
    q, k = torch.randn(1, 1, 4, 32), torch.randn(1, 1, 70, 32)
    nothing = torch.zeros(1, 1, 1, 70, dtype=torch.bool)
    assert torch.equal(S.decode_attention(q, k, k, nothing, 0.2), torch.zeros_like(q))
    print(f"ok: {checked} cases")


if __name__ == "__main__":
    main()
