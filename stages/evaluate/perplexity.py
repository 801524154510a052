"""Sliding-window perplexity, as in the transformers guide "Perplexity of fixed-length models".

Windows of ``max_length`` tokens start every ``stride`` tokens; in each window only the tokens not
scored by an earlier window are scored, each with up to ``max_length - 1`` tokens of context.
Windows of equal length run as one batch. The per-position log-probabilities of the first
``keep_positions`` scored tokens are kept for comparison with a reference model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.measure import input_device


@dataclass
class Window:
    begin: int
    end: int
    targets: int  # the last ``targets`` tokens of the window are scored


@dataclass
class PerplexityResult:
    nll_sum: float
    scored_tokens: int
    windows: int
    logprobs: list[torch.Tensor] = field(default_factory=list)  # [positions, vocab] float32, CPU

    @property
    def perplexity(self) -> float:
        return float(torch.exp(torch.tensor(self.nll_sum / self.scored_tokens)))


def windows(seq_len: int, max_length: int, stride: int) -> list[Window]:
    out, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        out.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == seq_len:
            break
    return out


def perplexity(model, ids: torch.Tensor, max_length: int, stride: int, batch_size: int,
               keep_positions: int = 0) -> PerplexityResult:
    """``ids``: 1-D token ids of the whole corpus."""
    result = PerplexityResult(0.0, 0, 0)
    all_windows = windows(ids.numel(), max_length, stride)
    kept = 0
    for start in range(0, len(all_windows), batch_size):
        group = all_windows[start:start + batch_size]
        for same in _same_length(group):
            batch = torch.stack([ids[w.begin:w.end] for w in same]).to(input_device(model))
            with torch.inference_mode():
                logits = model(input_ids=batch).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t+1
            targets = batch[:, 1:]
            for row, w in enumerate(same):
                scored = min(w.targets, w.end - w.begin - 1)  # the corpus's first token has no context
                lp = logp[row, -scored:]
                tok = targets[row, -scored:]
                result.nll_sum -= float(lp.gather(-1, tok.unsqueeze(-1)).sum())
                result.scored_tokens += scored
                result.windows += 1
                if kept < keep_positions:
                    take = lp[: keep_positions - kept].cpu()
                    result.logprobs.append(take)
                    kept += take.shape[0]
    return result


def _same_length(group: list[Window]) -> list[list[Window]]:
    by_len: dict[int, list[Window]] = {}
    for w in group:
        by_len.setdefault(w.end - w.begin, []).append(w)
    return list(by_len.values())
