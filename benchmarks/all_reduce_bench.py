"""Cost of one all-reduce inside a CUDA graph: the process group's (NCCL) against our one-shot
symmetric-memory path (stages/shard/all_reduce.py), at decode-step message sizes, and their results
checked against the exact sum.

    torchrun --nproc_per_node 2 benchmarks/all_reduce_bench.py [OUT_JSON]

Each measurement captures 64 all-reduces in one CUDA graph (a Llama-3-8B decode step does 64) and
times its replays with CUDA events; the table gives µs per all-reduce, median of 20 replays.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from stages.shard.all_reduce import AllReduce  # noqa: E402

CALLS, REPLAYS = 64, 20
SIZES_KIB = (8, 16, 64, 256, 1024)


def graph_of(reduce_once, x: torch.Tensor) -> torch.cuda.CUDAGraph:
    for _ in range(3):  # warm-up outside the capture (NCCL and the symm-mem kernels initialise here)
        reduce_once(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for _ in range(CALLS):
            y = reduce_once(y) * 0.5  # dependent chain, as in a model: each reduce waits for the last
    return graph


def us_per_call(graph: torch.cuda.CUDAGraph) -> float:
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


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
    if rank == 0:
        print(f"| message | NCCL µs | {ours.kind} µs | exact |", flush=True)
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['kib']} KiB | {r['nccl_us']} | {r['ours_us']} | {r['exact']} |", flush=True)
        if len(sys.argv) > 1:
            json.dump({"device": torch.cuda.get_device_name(), "world": world, "torch": torch.__version__,
                       "rows": rows}, open(sys.argv[1], "w"), indent=1)
    dist.barrier()
    os._exit(0)  # skip NCCL's teardown: nothing is left to flush


if __name__ == "__main__":
    main()
