"""Cost of one all-reduce inside a CUDA graph: the process group's (NCCL) against our one-shot
symmetric-memory path (stages/shard/all_reduce.py), at decode-step message sizes, and their results
checked against the exact sum; then the all-reduce + residual add + RMSNorm of a decoder layer,
unfused (one-shot, then inductor's add + RMSNorm kernel) against fused into one kernel
(stages/shard/all_reduce_norm.py), at batch 1 and 32 of a 4096-wide hidden state, checked against
each other and across ranks.

    torchrun --nproc_per_node 2 benchmarks/all_reduce_bench.py [OUT_JSON]

Each measurement captures 64 all-reduces in one CUDA graph (a Llama-3-8B decode step does 64) and
times its replays with CUDA events; the tables give µs per all-reduce, median of 20 replays.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.graph_timing import captured, us_per_call as replay_us  # noqa: E402
from stages.shard.all_reduce import WAIT_IN_TURN, WAIT_TOGETHER, AllReduce  # noqa: E402
from stages.shard.all_reduce_norm import RUNS, add_rms_norm  # noqa: E402

CALLS, REPLAYS = 64, 20
SIZES_KIB = (8, 16, 64, 256, 1024)


def graph_of(reduce_once, x: torch.Tensor) -> torch.cuda.CUDAGraph:
    """64 all-reduces in a row, each of the last one's result (as in a model: each waits for the last)."""
    def chain():
        y = x
        for _ in range(CALLS):
            y = reduce_once(y) * 0.5
        return y
    return captured(chain)  # warm-ups first: NCCL and the symm-mem kernels initialise there


def norm_graph_of(step, x: torch.Tensor, residual: torch.Tensor) -> torch.cuda.CUDAGraph:
    """64 decoder-layer ends in a row: (residual, normed) = step(partial, residual); the next
    partial is derived from the normed output, as the next layer's would be."""
    def chain():
        h, y = residual, x
        for _ in range(CALLS):
            h, y = step(y * 0.5, h)
        return h
    return captured(chain)


def norm_rows(ours: AllReduce, device: torch.device, rank: int, world: int) -> list[dict]:
    """Unfused against fused all-reduce + add + RMSNorm: µs per layer end, and their agreement."""
    hidden, eps = 4096, 1e-5
    torch.manual_seed(0)  # the weight and residual are the same on every rank, the partial sums differ
    weight = torch.randn(hidden, device=device, dtype=torch.bfloat16)
    add_norm = torch.compile(lambda s, r: add_rms_norm(s, r, weight, eps, True))  # inductor's one kernel

    def unfused(x, r):
        return add_norm(ours(x), r)

    def fused(x, r):
        return torch.ops.optipipe.tp_all_reduce_add_rms_norm(x, r, weight, eps, True, ours.name)

    rows = []
    for batch in (1, 32):
        torch.manual_seed(100)
        residual = torch.randn(batch, hidden, device=device, dtype=torch.bfloat16)
        torch.manual_seed(1 + rank)
        x = torch.randn(batch, hidden, device=device, dtype=torch.bfloat16)
        RUNS.clear()
        (h_u, y_u), (h_f, y_f) = unfused(x, residual), fused(x, residual)
        every = [torch.empty_like(h_f) for _ in range(world)]
        dist.all_gather(every, h_f)
        row = {"batch": batch, "kernel": "+".join(sorted(RUNS)),
               "residual_equal": bool(torch.equal(h_u, h_f)),
               "normed_max_diff": float((y_u.float() - y_f.float()).abs().max()),
               "ranks_identical": all(torch.equal(every[0], e) for e in every)}
        for name, fn in (("unfused", unfused), ("fused", fused)):
            row[f"{name}_us"] = round(us_per_call(norm_graph_of(fn, x, residual)), 2)
        ours.push_wait = WAIT_TOGETHER  # the same kernel polling every peer at once (shard.fuse_norm_wait)
        RUNS.clear()
        h_t, y_t = fused(x, residual)
        row["together_kernel"] = "+".join(sorted(RUNS))
        row["together_equal"] = bool(torch.equal(h_t, h_f) and torch.equal(y_t, y_f))
        row["together_us"] = round(us_per_call(norm_graph_of(fused, x, residual)), 2)
        ours.push_wait = WAIT_IN_TURN
        rows.append(row)
    return rows


def us_per_call(graph: torch.cuda.CUDAGraph) -> float:
    return replay_us(graph, CALLS, REPLAYS, before=dist.barrier)  # every rank replays at once


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", device_id=device)
    ours = AllReduce(dist.group.WORLD, device, "auto", max_bytes=2 << 20)

    def nccl(x):
        out = x.clone()
        dist.all_reduce(out)
        return out

    rows = []
    for kib in SIZES_KIB:
        n = kib * 1024 // 2
        x = torch.full((n,), float(rank + 1), device=device, dtype=torch.bfloat16)
        exact = bool((ours(x) == world * (world + 1) / 2).all())
        row = {"kib": kib, "exact": exact, "ours_kind": ours.kind}
        for name, fn in (("nccl", nccl), ("ours", ours)):
            row[f"{name}_us"] = round(us_per_call(graph_of(fn, x.clone())), 2)
        rows.append(row)
    fused_rows = norm_rows(ours, device, rank, world)
    if rank == 0:
        print(f"| message | NCCL µs | {ours.kind} µs | exact |", flush=True)
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['kib']} KiB | {r['nccl_us']} | {r['ours_us']} | {r['exact']} |", flush=True)
        print("\n| batch × 4096 | unfused µs (one-shot + add/RMSNorm) | fused µs | fused ran as | residual equal "
              "| normed max diff | ranks identical | fused, peers polled together µs | same bits |"
              "\n|---|---|---|---|---|---|---|---|---|")
        for r in fused_rows:
            print(f"| {r['batch']} | {r['unfused_us']} | {r['fused_us']} | {r['kernel']} | {r['residual_equal']} "
                  f"| {r['normed_max_diff']:.3g} | {r['ranks_identical']} | {r['together_us']} ({r['together_kernel']}) "
                  f"| {r['together_equal']} |", flush=True)
        if len(sys.argv) > 1:
            json.dump({"device": torch.cuda.get_device_name(), "world": world, "torch": torch.__version__,
                       "rows": rows, "fused_rows": fused_rows}, open(sys.argv[1], "w"), indent=1)
    dist.barrier()
    os._exit(0)  # skip NCCL's teardown: nothing is left to flush


if __name__ == "__main__":
    main()
