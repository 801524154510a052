"""A decode step's attention alone: SDPA on the grouped-query heads (what `generate=fast` runs by
default) against the split kernel (`generate.fast_decode_attention=split_kv`) at each of its tunings,
on one GPU, at the shapes of an 8B Llama's decode step (32 query heads over 8 key/value heads; a
tensor-parallel rank holds 8 / tp of them), prompt 128 + 256 new tokens of static cache, half filled.

    python benchmarks/decode_attention_bench.py [OUT_JSON]

Each measurement captures 32 calls in one CUDA graph — one per layer, each on its own cache, each
query taken from the previous call's output as the next layer's would be — and times its replays with
CUDA events: µs per call, median of 20 replays. Every tuning's output is checked against PyTorch's
attention first (max difference printed); the last table gives the fastest tuning per shape.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.graph_timing import captured, us_per_call as replay_us  # noqa: E402
from stages.attention import split_kv_decode as S  # noqa: E402

LAYERS, REPLAYS, LENGTH, DIM, GROUP = 32, 20, 384, 128, 4
# (name, batch, key/value heads per rank)
SHAPES = [("b1 one GPU", 1, 8), ("b1 TP2", 1, 4), ("b1 TP4", 1, 2), ("b32 one GPU", 32, 8), ("b32 TP4", 32, 2)]
TUNINGS = [S.Tuning(block=b, warps=w, dot=d, one_kernel=o)
           for b, w, d, o in itertools.product((16, 32, 64), (2, 4, 8), (False, True), (True, False))]


def case(batch: int, kv_heads: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    caches = [tuple(torch.randn(batch, kv_heads, LENGTH, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
              for _ in range(LAYERS)]
    mask = torch.ones(batch, 1, 1, LENGTH, dtype=torch.bool, device="cuda")
    mask[..., LENGTH // 2:] = False  # the static cache's unfilled half
    q = torch.randn(batch, kv_heads, GROUP, DIM, device="cuda", dtype=torch.bfloat16)
    return caches, mask, q


def sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def us_per_call(attend, caches, mask, q) -> float:
    def chain():
        x = q
        for k, v in caches:
            x = attend(x, k, v, mask, DIM ** -0.5) * 0.5
        return x
    return replay_us(captured(chain, warmups=2), LAYERS, REPLAYS)


def name(t: S.Tuning) -> str:
    return f"block {t.block} warps {t.warps} {'dot' if t.dot else 'sums'} {'one kernel' if t.one_kernel else 'two kernels'}"


def main() -> None:
    S.reserve_counts(torch.device("cuda", torch.cuda.current_device()))
    rows = []
    for label, batch, kv_heads in SHAPES:
        caches, mask, q = case(batch, kv_heads)
        k, v = caches[0]
        want = S.reference(q, k, v, mask, DIM ** -0.5).float()
        row = {"shape": label, "batch": batch, "kv_heads": kv_heads, "sdpa_us": round(us_per_call(sdpa, caches, mask, q), 2),
               "tunings": []}
        for t in TUNINGS:
            S.TUNING = t
            err = (S.decode_attention(q, k, v, mask, DIM ** -0.5).float() - want).abs().max().item()
            row["tunings"].append({"tuning": name(t), "us": round(us_per_call(S.decode_attention, caches, mask, q), 2),
                                   "max_diff": err, **t.__dict__})
        S.TUNING = None  # as the op picks by shape
        row["default_us"] = round(us_per_call(S.decode_attention, caches, mask, q), 2)
        rows.append(row)
        best = sorted(row["tunings"], key=lambda r: r["us"])[:5]
        print(f"{label}: sdpa {row['sdpa_us']} µs, split_kv default {row['default_us']} µs; fastest:", flush=True)
        for r in best:
            print(f"    {r['us']:7.2f} µs  {r['tuning']}  (max diff {r['max_diff']:.3g})", flush=True)
        worst = max(r["max_diff"] for r in row["tunings"])
        print(f"    largest difference from PyTorch's attention over all tunings: {worst:.3g}", flush=True)
        del caches
    print("\n| shape | SDPA µs | split_kv default µs | fastest tuning | its µs |\n|---|---|---|---|---|")
    for r in rows:
        b = min(r["tunings"], key=lambda t: t["us"])
        print(f"| {r['shape']} | {r['sdpa_us']} | {r['default_us']} | {b['tuning']} | {b['us']} |")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
