"""Per-step clock for one ``generate`` call that does not change what it measures.

A streamer would force a host sync every token (transformers copies each token to the CPU for
it), which stops the CPU from queueing the next step while the GPU works: at batch 32 on an H200
that cost a third of the throughput. Instead a logits processor, called once per step in stream
order, records a CUDA event (no sync); the events are read once the call has finished. On CPU,
where execution is synchronous anyway, it reads the wall clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch


class StepClock:
    """A logits processor that timestamps every decode step and leaves the scores untouched."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list = []
        self.start = self._mark()

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.marks.append(self._mark())
        return scores

    def finish(self) -> "Timing":
        """Close the call and convert marks into seconds since ``start``."""
        end = self._mark()
        if not self.cuda:
            return Timing(0.0, [m - self.start for m in self.marks], end - self.start, 0)
        torch.cuda.synchronize(self.device)
        since = lambda e: self.start.elapsed_time(e) / 1e3  # noqa: E731 - ms → s
        return Timing(0.0, [since(m) for m in self.marks], since(end), 0)


@dataclass
class Timing:
    """One timed generation: start, one timestamp per step (logits of token i ready), end."""

    start: float
    steps: list[float]
    end: float
    batch: int

    @property
    def ttft(self) -> float:
        return self.steps[0] - self.start

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.steps))

    @property
    def decode_tokens_per_s(self) -> float:
        if len(self.steps) < 2:
            return float("nan")
        return self.batch * (len(self.steps) - 1) / (self.steps[-1] - self.steps[0])

    @property
    def e2e_tokens_per_s(self) -> float:
        return self.batch * len(self.steps) / (self.end - self.start)


@dataclass
class TimingSummary:
    runs: list[Timing] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Percentiles across repeats (TTFT) and across every step of every repeat (ITL)."""
        ttft = np.array([r.ttft for r in self.runs]) * 1e3
        itl = np.array([x for r in self.runs for x in r.itls]) * 1e3
        decode = [r.decode_tokens_per_s for r in self.runs if len(r.steps) > 1]
        out = {
            "ttft_ms_p50": float(np.percentile(ttft, 50)),
            "ttft_ms_p90": float(np.percentile(ttft, 90)),
            "e2e_tokens_per_s": float(np.median([r.e2e_tokens_per_s for r in self.runs])),
            "new_tokens": float(np.median([len(r.steps) for r in self.runs])),
            "seconds_per_run_p50": float(np.median([r.end - r.start for r in self.runs])),
            "repeats": float(len(self.runs)),
        }
        if decode:  # one new token has no decode step: the metric is absent, never NaN
            out["decode_tokens_per_s"] = float(np.median(decode))
        # how far the repeats lie apart, beside each median: (max - min) / median
        for name, values in (("decode_tokens_per_s", decode), ("e2e_tokens_per_s", [r.e2e_tokens_per_s for r in self.runs])):
            if len(values) > 1:
                out[f"{name}_spread_pct"] = float(100 * (max(values) - min(values)) / np.median(values))
        if itl.size:
            out["itl_ms_p50"] = float(np.percentile(itl, 50))
            out["itl_ms_p90"] = float(np.percentile(itl, 90))
        return out


# repeats further apart than this: the median is not one steady speed. A CPU shares its cores with
# everything else on the host: 3 repeats of the default job on an idle 2-core machine lie ~10 % apart
NOISY_SPREAD_PCT = {"cuda": 10.0, "cpu": 25.0}
NOISY_ITL_RATIO = 1.5  # p90 / p50 of the inter-token latency above this: steps stall now and then


def noise(metrics: dict[str, float], cuda: bool) -> str:
    """Why this run's timings are not steady (empty: they are). On CPU the host's load is named,
    since other processes are the usual cause there."""
    import os

    reasons = []
    spread = metrics.get("decode_tokens_per_s_spread_pct", metrics.get("e2e_tokens_per_s_spread_pct", 0.0))
    limit = NOISY_SPREAD_PCT["cuda" if cuda else "cpu"]
    if spread > limit:
        reasons.append(f"repeats spread {spread:.0f} % (> {limit:.0f} %)")
    p50, p90 = metrics.get("itl_ms_p50", 0.0), metrics.get("itl_ms_p90", 0.0)
    if p50 > 0 and p90 / p50 > NOISY_ITL_RATIO:
        reasons.append(f"ITL p90/p50 {p90 / p50:.1f} (> {NOISY_ITL_RATIO})")
    if metrics.get("gpu_slowdown_share", 0.0) > 0:  # stages/generate/gpu_clocks.py
        reasons.append(f"GPU clocks slowed in {metrics['gpu_slowdown_share']:.0%} of samples (tag generate.gpu_clocks)")
    if reasons and not cuda and hasattr(os, "getloadavg"):
        reasons.append(f"host load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return "; ".join(reasons)

