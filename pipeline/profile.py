"""What a decode run spends its time on: one generate under the PyTorch profiler, kernels grouped.

For a memory-bound decode the questions are: is the device busy at all (a low busy share means the
host is in the way: launches, Python, synchronisation), and of the device time, how much is weight
streaming (matmuls), attention, collectives, and the small element-wise rest.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

from pipeline import quiet

# kernel / op name → category; first match wins
CATEGORIES: list[tuple[str, re.Pattern]] = [
    # an M=1 matmul that inductor turned into a reduction (coordinate-descent tuning) keeps "mm" in
    # the fused kernel's name; it streams weights like any matmul
    ("matmul", re.compile(r"^triton_(red|per)_fused_(\w*_)?mm(_|$)")),
    # inductor's other kernels are named after every op they fused ("…_bmm_cat_cos…", "…_tp_all_reduce_…"
    # when the fused ops feed a collective): element-wise work, whatever the names of its neighbours
    ("other", re.compile(r"^triton_(poi|red|per)_")),
    ("communication", re.compile(r"nccl|all_?reduce|all_?gather|reduce_scatter|gloo|c10d|wait_tensor", re.I)),
    ("attention", re.compile(r"attention|attn|sdpa|flash|fmha|softmax", re.I)),
    ("matmul", re.compile(r"gemm|matmul|(^|[^a-z])mm([^a-z]|$)|addmm|bmm|linear|cutlass|nvjet|sm90_|int4pack|tinygemm",
                          re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|cat|index", re.I)),
]


def category(name: str) -> str:
    return next((label for label, pattern in CATEGORIES if pattern.search(name)), "other")


def profile_call(run: Callable[[], Any], cuda: bool) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Profile ``run()``; return (shares and busy fraction, top kernels as (name, ms, calls))."""
    from torch.profiler import ProfilerActivity, profile

    # On CUDA only the device is traced: tracing every host op too slowed host-bound rows 4× (plain
    # generate, batch 1, H200), which made their busy fraction meaningless.
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with quiet.native_stderr(), profile(activities=activities) as prof:  # the profiler library's start/stop lines
        start = time.perf_counter()  # inside: the profiler's own start and trace collection are not the run's
        run()  # the generate stage's runs end synchronized, so the wall time covers their device work
        wall_ms = (time.perf_counter() - start) * 1e3
    rows = []
    for event in prof.key_averages():
        # device kernels on CUDA; on CPU, operators' own time (no double counting of nested ops)
        ms = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3
        if ms > 0 and (not cuda or event.device_type.name == "CUDA"):
            rows.append((event.key, ms, event.count))
    total = sum(ms for _, ms, _ in rows) or 1.0
    shares: dict[str, float] = {}
    for name, ms, _ in rows:
        key = f"profile_{category(name)}_share"
        shares[key] = shares.get(key, 0.0) + ms / total
    shares["profile_busy_fraction"] = min(total / wall_ms, 1.0)  # device (or op) time ÷ wall time
    shares["profile_busy_ms"] = total
    shares["profile_wall_ms"] = wall_ms
    return shares, sorted(rows, key=lambda r: -r[1])[:15]


def write_report(path: Path, title: str, shares: dict[str, float], top: list[tuple[str, float, int]]) -> Path:
    lines = [f"# {title}", "", f"busy fraction: {shares['profile_busy_fraction']:.2f} of "
             f"{shares['profile_wall_ms']:.0f} ms wall"]
    if "profile_device_ms_per_step" in shares:
        lines.append(f"per generated token: {shares['profile_device_ms_per_step']:.3f} ms busy, of it "
                     f"{shares['profile_matmul_ms_per_step']:.3f} ms matmul")
    lines += ["", "| category | share of busy time |", "|---|---|"]
    lines += [f"| {k.removeprefix('profile_').removesuffix('_share')} | {v:.2f} |"
              for k, v in sorted(shares.items()) if k.endswith("_share")]
    lines += ["", "| kernel / op | ms | calls |", "|---|---|---|"]
    lines += [f"| `{name[:90]}` | {ms:.2f} | {calls} |" for name, ms, calls in top]
    path.write_text("\n".join(lines) + "\n")
    return path
