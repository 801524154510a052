"""One Linear layer of Llama-3-8B's shapes at 1, 32 and 4096 activation rows (batch 1 and 32 decode, a
batch of 32 prompts of 128 tokens): bf16 cuBLAS against two int4 kernels torchao 0.18 can call —
tinygemm (what ``quantize=int4_torchao`` runs on CUDA, bf16 activations) and gemlite's Triton kernels
(torchao's ``UIntxWeightOnlyConfig``; float16 activations, since torchao builds those layers from
float16 scales; needs ``pip install gemlite==0.5.1.post1``, which is not an optipipe dependency: 0.6
hands torchao 0.18 four tensors where it takes three) — each timed under a CUDA graph after one untimed
call (gemlite picks its kernel's configuration there). Also prints how long each int4 form took to
quantize a weight and to make its first call. The output head stays bf16 in the int4 rows, as
``quantize=int4_torchao`` leaves it. Says whether a 4-bit kernel at hand can beat bf16 at a batch.

    python benchmarks/int4_linear_bench.py [--rows 1,32,4096] [--group 128] [--out DIR]     (CUDA only)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fp8_linear_bench import SHAPES, print_table  # noqa: E402


def int4_layer(w: torch.Tensor, kernel: str, group: int) -> tuple[Callable, torch.dtype, int, float]:
    """(the quantized layer, the activation dtype it takes, its weight bytes, seconds to quantize)."""
    from torchao.prototype.quantization.quant_api import UIntxWeightOnlyConfig
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    from pipeline.measure import weight_bytes

    dtype = torch.float16 if kernel == "gemlite" else torch.bfloat16
    config = (UIntxWeightOnlyConfig(group_size=group, bit_width=4, set_inductor_config=False) if kernel == "gemlite"
              else Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d"))
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=dtype)
    layer.weight.data.copy_(w)
    torch.cuda.synchronize()
    start = time.perf_counter()
    quantize_(layer, config)
    torch.cuda.synchronize()
    return layer, dtype, int(weight_bytes(layer)), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,32,4096", help="activation rows to measure")
    ap.add_argument("--group", type=int, default=128, help="int4 group size (generate's auto pick for 8B: 128)")
    ap.add_argument("--out", type=Path, default=Path("outputs/int4_linear_bench"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("int4_linear_bench needs a CUDA GPU (tinygemm and gemlite are CUDA kernels)")
    from triton.testing import do_bench_cudagraph

    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    results, costs = [], []
    args.out.mkdir(parents=True, exist_ok=True)
    for shape, ((n, k), _) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        dense = (partial(F.linear, weight=w), torch.bfloat16, w.numel() * 2)
        variants: dict[str, tuple[Callable, torch.dtype, int]] = {"bf16 cuBLAS": dense}
        for kernel in ("tinygemm", "gemlite"):
            if shape == "lm_head":  # the head stays bf16 (quantize.include_embeddings=false)
                variants[f"int4 {kernel}"] = dense
                continue
            try:
                layer, dtype, nbytes, seconds = int4_layer(w, kernel, args.group)
                variants[f"int4 {kernel}"] = (layer, dtype, nbytes)
                costs.append({"shape": shape, "kernel": kernel, "quantize_s": seconds})
            except Exception as e:  # a kernel this card or version cannot run: say so, go on
                costs.append({"shape": shape, "kernel": kernel, "error": f"{type(e).__name__}: {e}"[:200]})
            print(json.dumps(costs[-1]), flush=True)
        for m in rows:
            for name, (fn, dtype, nbytes) in variants.items():
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                try:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    with torch.no_grad():
                        fn(x)  # gemlite picks its kernel's configuration here
                        torch.cuda.synchronize()
                        first = time.perf_counter() - start
                        ms = do_bench_cudagraph(lambda: fn(x), rep=50)
                    results.append({"variant": name, "rows": m, "shape": shape, "us": ms * 1e3, "first_call_s": first,
                                    "weight_gb_per_s": nbytes / ms / 1e6})
                except Exception as e:
                    results.append({"variant": name, "rows": m, "shape": shape, "error": f"{type(e).__name__}: {e}"[:200]})
                print(json.dumps(results[-1]), flush=True)
        (args.out / "int4_linear_bench.json").write_text(json.dumps({"timings": results, "costs": costs}, indent=1))
        del w, variants
        torch.cuda.empty_cache()
    print_table(results)
    print("\n| shape | kernel | quantize s | first call s (per rows) |\n|---|---|---|---|")
    for c in costs:
        firsts = [f"{r['first_call_s']:.2f}" for r in results
                  if r["shape"] == c["shape"] and r["variant"] == f"int4 {c['kernel']}" and "first_call_s" in r]
        print(f"| {c['shape']} | {c['kernel']} | {c.get('quantize_s', float('nan')):.2f} | {' / '.join(firsts)} |")


if __name__ == "__main__":
    main()
