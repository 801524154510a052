"""Per-token clock: a streamer that timestamps every decode step of one ``generate`` call."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from transformers.generation.streamers import BaseStreamer

from pipeline import measure


class TokenClock(BaseStreamer):
    """``generate`` calls ``put`` once with the prompt, then once per new token (all rows at once)."""

    def __init__(self, devices: list[int]) -> None:
        self.devices = devices
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times.append(measure.now(self.devices))  # synchronize: the token must really exist

    def end(self) -> None:
        pass


@dataclass
class Timing:
    """One timed generation: start, one timestamp per step, end."""

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
        out = {
            "ttft_ms_p50": float(np.percentile(ttft, 50)),
            "ttft_ms_p90": float(np.percentile(ttft, 90)),
            "decode_tokens_per_s": float(np.median([r.decode_tokens_per_s for r in self.runs])),
            "e2e_tokens_per_s": float(np.median([r.e2e_tokens_per_s for r in self.runs])),
            "new_tokens": float(np.median([len(r.steps) for r in self.runs])),
            "seconds_per_run_p50": float(np.median([r.end - r.start for r in self.runs])),
            "repeats": float(len(self.runs)),
        }
        if itl.size:
            out["itl_ms_p50"] = float(np.percentile(itl, 50))
            out["itl_ms_p90"] = float(np.percentile(itl, 90))
        return out
