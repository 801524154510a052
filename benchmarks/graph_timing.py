"""How the kernel benchmarks time GPU work: a chain of calls captured in one CUDA graph (so launch
overhead is what a model's captured decode step pays), replayed and timed with CUDA events."""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch


def captured(chain: Callable[[], Any], warmups: int = 3) -> torch.cuda.CUDAGraph:
    """``chain`` run ``warmups`` times outside a capture (libraries set up, kernels compile), then
    captured once."""
    for _ in range(warmups):
        chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    return graph


def us_per_call(graph: torch.cuda.CUDAGraph, calls: int, replays: int = 20,
                before: Callable[[], Any] | None = None) -> float:
    """µs per call of a graph holding ``calls`` calls: the median of ``replays`` replays. ``before``
    runs ahead of each replay (a barrier, so that ranks start together)."""
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if before is not None:
            before()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)
