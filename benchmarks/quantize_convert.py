"""Side by side in one process on one card: plain transformers vs the pipeline's quantize × convert.

    python benchmarks/quantize_convert.py --model llama3_8b_random --batches 1,32 \
        --configs none:sdpa,none:compile,int8:sdpa,nf4:sdpa --out results.json

"plain" is what a user types: from_pretrained(dtype=bfloat16, device_map=cuda) then generate().
"plain_static" adds cache_implementation="static" (transformers then auto-compiles on CUDA).
Each pipeline configuration is loaded once through the pipeline's own stages, then measured at every
batch size with the same prompts (exact prompt and output lengths).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize_config_module  # noqa: E402

from pipeline import measure, roofline  # noqa: E402
from pipeline.contract import STAGE_ORDER  # noqa: E402
from pipeline.runner import make_plan, open_context  # noqa: E402
from pipeline.validate import resolve  # noqa: E402
from stages.load import sources  # noqa: E402


def composed(overrides: list[str]):
    with initialize_config_module(version_base="1.3", config_module="conf"):
        return compose(config_name="config", overrides=overrides)


def common(args) -> list[str]:
    return [f"model={args.model}", "tracker=none", f"load.dtype={args.dtype}", "generate.benchmark=true",
            f"generate.prompt_tokens={args.prompt}", f"generate.max_new_tokens={args.new}",
            f"generate.repeats={args.repeats}", f"generate.warmup={args.warmup}"]


def run_pipeline(args, quantize: str, convert: str) -> list[dict]:
    resolved = resolve(composed(common(args) + [f"quantize={quantize}", f"convert={convert}"]))
    for w in resolved.warnings:
        print(f"warning: {w}", flush=True)
    plan = make_plan(resolved)
    ctx = open_context(resolved, plan, Path(args.workdir))
    tags, rows = {}, []
    for name in STAGE_ORDER[:4]:  # load, quantize, convert, shard: what runs once per model
        tags.update(resolved.stages[name].apply(ctx).tags)
    generate = resolved.stages["generate"]
    for batch in args.batches:
        generate.cfg.batch_size = batch
        m = generate.apply(ctx).metrics
        rows.append({"config": f"{quantize}+{convert}", "batch": batch, **m,
                     "weight_bytes": float(measure.weight_bytes(ctx.model)),
                     "sdpa_backend": tags.get("convert.sdpa_backend_observed", "")})
        print(json.dumps(rows[-1]), flush=True)
    del ctx
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def run_plain(args, static: bool) -> list[dict]:
    """The user's default: no pipeline, one generate call timed as a whole."""
    from transformers import AutoModelForCausalLM

    resolved = resolve(composed(common(args)))
    ckpt = sources.checkpoint(resolved.model, sources.cache_root(None), args.dtype)
    model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=getattr(torch, args.dtype), device_map="cuda")
    extra = {"cache_implementation": "static"} if static else {}
    bandwidth = roofline.copy_bandwidth_bytes_per_s("cuda:0")
    rows = []
    for batch in args.batches:
        ids = torch.randint(300, 20000, (batch, args.prompt), device="cuda")
        kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                  attention_mask=torch.ones_like(ids), **extra)
        for _ in range(args.warmup):
            model.generate(ids, **kw)
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            start = measure.now([0])
            model.generate(ids, **kw)
            times.append(measure.now([0]) - start)
        seconds = sorted(times)[len(times) // 2]
        wbytes = float(measure.weight_bytes(model))
        step = roofline.decode_step_bytes(wbytes, model.config, batch, args.prompt, args.new, 2)
        rows.append({"config": "plain_static" if static else "plain", "batch": batch,
                     "e2e_tokens_per_s": batch * args.new / seconds,
                     "memory_peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "weight_bytes": wbytes,
                     # whole-call time includes prefill, so this MBU is a lower bound
                     "mbu": roofline.mbu(step, seconds / args.new, bandwidth),
                     "bandwidth_gb_per_s": bandwidth / 1e9})
        print(json.dumps(rows[-1]), flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    plain = {r["batch"]: r["e2e_tokens_per_s"] for r in rows if r["config"] == "plain"}
    lines = ["| config | batch | e2e tok/s | × plain | decode tok/s | TTFT p50 ms | ITL p50 ms | peak GiB | weights GiB | MBU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["e2e_tokens_per_s"] / plain[r["batch"]] if r["batch"] in plain else float("nan")
        lines.append(f"| {r['config']} | {r['batch']} | {r['e2e_tokens_per_s']:.1f} | {ratio:.2f} | "
                     f"{r.get('decode_tokens_per_s', float('nan')):.1f} | {r.get('ttft_ms_p50', float('nan')):.1f} | "
                     f"{r.get('itl_ms_p50', float('nan')):.2f} | {r['memory_peak_allocated_gib']:.1f} | "
                     f"{r['weight_bytes'] / 2**30:.2f} | {r.get('mbu', float('nan')):.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3_8b_random")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--configs", default="none:sdpa,none:compile,int8:sdpa,nf4:sdpa")
    p.add_argument("--plain", default="plain,plain_static")
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--out", default="results.json")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict] = []
    start = time.time()
    for kind in filter(None, args.plain.split(",")):
        rows += run_plain(args, static=kind == "plain_static")
    for item in filter(None, args.configs.split(",")):
        q, c = item.split(":")
        try:
            rows += run_pipeline(args, q, c)
        except Exception as e:  # one failing configuration must not hide the others' numbers
            print(f"{item} failed: {type(e).__name__}: {e}", flush=True)
            rows.append({"config": f"{q}+{c}", "error": str(e)})
        Path(args.out).write_text(json.dumps(rows, indent=2))
    ok = [r for r in rows if "error" not in r]
    print(f"\n{torch.cuda.get_device_name(0)}, {time.strftime('%Y-%m-%d')}, {time.time() - start:.0f} s\n")
    print(table(ok))
    for r in rows:
        if "error" in r:
            print(f"{r['config']}: {r['error'][:300]}")
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
