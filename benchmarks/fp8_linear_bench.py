"""One Linear layer of Llama-3-8B's shapes at 1 and 32 activation rows: bf16 against the float8 ways
of computing it, each op compiled alone (coordinate-descent tuning, as generate=fast compiles) and
timed under a CUDA graph. Says which float8 form reads its weights fastest, apart from the rest of
the decode step.

    python benchmarks/fp8_linear_bench.py [--rows 1,32] [--out DIR]     (CUDA only)

Columns: microseconds per call, the weight bytes read per second, and ``ms/token``: the per-token
total over 32 layers (q/k/v joined, o, gate/up joined, down) and the head.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages import float8_rows  # noqa: E402

# (out, in) features and how many per generated token
SHAPES = {"qkv": ((6144, 4096), 32), "o": ((4096, 4096), 32), "gate_up": ((28672, 4096), 32),
          "down": ((4096, 14336), 32), "lm_head": ((128256, 4096), 1)}
TUNED = {"coordinate_descent_tuning": True}


def scaled_mm_dynamic(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each activation row scaled to float8 as it comes, then cuBLAS's row-wise scaled FP8 matmul."""
    x_scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / float8_rows.LARGEST
    xq = (x.float() / x_scale).to(float8_rows.FORMAT)
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale[None, :], out_dtype=x.dtype)


def variants(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> dict[str, tuple[Callable, int]]:
    """name → (function of x, weight bytes it reads). Each is compiled afresh for its shape."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, PerRow,
                                      quantize_)

    def torchao(config) -> Callable:
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        layer.weight.data.copy_(w)
        quantize_(layer, config)
        return torch.compile(layer, options=TUNED, dynamic=False)

    dense, eight = w.numel() * 2, q.numel() + s.numel() * 4
    rows = torch.compile(lambda x: float8_rows.linear(x, q, s, None), options=TUNED, dynamic=False)
    return {"bf16 cuBLAS": (lambda x: F.linear(x, w), dense),
            "bf16 inductor": (torch.compile(lambda x: F.linear(x, w), options=TUNED, dynamic=False), dense),
            "float8 rows (fp8_weight_only)": (rows, eight),
            "float8 + dynamic rows, _scaled_mm": (torch.compile(lambda x: scaled_mm_dynamic(x, q, s), options=TUNED,
                                                                dynamic=False), eight),
            "torchao fp8 weight-only": (torchao(Float8WeightOnlyConfig(granularity=PerRow())), eight),
            "torchao fp8 dynamic (quantize=fp8)": (torchao(Float8DynamicActivationFloat8WeightConfig(
                granularity=PerRow())), eight)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,32", help="activation rows (batch) to measure")
    ap.add_argument("--out", type=Path, default=Path("outputs/fp8_linear_bench"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_linear_bench needs a CUDA GPU of compute capability ≥ 8.9 (float8 matmuls)")
    from triton.testing import do_bench_cudagraph

    torch.manual_seed(0)
    results = []
    for m in (int(r) for r in args.rows.split(",")):
        for shape, ((n, k), _) in SHAPES.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q, s = float8_rows.quantize_rows(w)
            for name, (fn, nbytes) in variants(w, q, s).items():
                torch._dynamo.reset()  # a fresh compile per shape: no recompile limit, no eager fallback
                try:
                    fn(x)
                    ms = do_bench_cudagraph(lambda: fn(x), rep=50)
                    results.append({"variant": name, "rows": m, "shape": shape, "us": ms * 1e3,
                                    "weight_gb_per_s": nbytes / ms / 1e6})
                except Exception as e:  # a variant this card or version cannot run: say so, go on
                    results.append({"variant": name, "rows": m, "shape": shape, "error": f"{type(e).__name__}: {e}"[:200]})
                print(json.dumps(results[-1]), flush=True)
            del w, q, s
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_linear_bench.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: list[dict]) -> None:
    """One markdown row per (variant, rows): µs per call (weight GB/s) for each shape, and the
    per-token total over 32 layers and the head."""
    print(f"\n{torch.cuda.get_device_name()} · torch {torch.__version__}\n")
    print("| variant | rows | " + " | ".join(f"{s} µs (GB/s)" for s in SHAPES) + " | ms/token |")
    print("|---|---|" + "---|" * (len(SHAPES) + 1))
    for m in sorted({r["rows"] for r in results}):
        for name in dict.fromkeys(r["variant"] for r in results):
            got = {r["shape"]: r for r in results if r["variant"] == name and r["rows"] == m}
            cells = [f"{got[s]['us']:.1f} ({got[s]['weight_gb_per_s']:.0f})" if "us" in got.get(s, {}) else "failed"
                     for s in SHAPES]
            per_token = (sum(got[s]["us"] * per for s, (_, per) in SHAPES.items()) / 1e3
                         if all("us" in got.get(s, {}) for s in SHAPES) else float("nan"))
            print(f"| {name} | {m} | " + " | ".join(cells) + f" | {per_token:.2f} |")

if __name__ == "__main__":
    main()
