"""Perplexity over a corpus, in windows of at most ``max_length`` tokens. Two ways to cut them:

``strided`` (the transformers guide, "Perplexity of fixed-length models"): windows of
``max_length`` start every ``stride`` tokens; each scores the tokens no earlier window scored,
with up to ``max_length - 1`` tokens of context. The corpus's first token is never scored (nothing
precedes it), nor, when ``stride = max_length``, the first token of each window.

``rolling`` (lm-evaluation-harness's ``loglikelihood_rolling``, used for wikitext-style
perplexity): every token is scored exactly once. A prefix token (BOS, else EOS) goes first, so the
first token is predicted too; the first window predicts the first ``max_length`` tokens; each later
window predicts the next ``max_length`` (the last one fewer) and is back-filled with the preceding
tokens to a full ``max_length`` of input, so late tokens see the most context the window allows.

A window reads ``seq[begin:end]``; the logit at position p predicts ``seq[begin + p + 1]``, and the
window scores the targets ``seq[first:last]``. Windows of equal length run as one batch. The
per-position log-probabilities of the first ``keep_positions`` scored tokens are kept for comparison
with a reference model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.measure import input_device

WINDOWINGS = ("strided", "rolling")


@dataclass
class Window:
    begin: int
    end: int
    first: int  # targets seq[first:last], each predicted from the tokens before it in the window
    last: int

    @property
    def targets(self) -> int:
        return self.last - self.first


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
    """Strided windows over ``seq_len`` tokens (a corpus shorter than ``max_length``: one window)."""
    out, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        out.append(Window(begin, end, max(prev_end, begin + 1), end))
        prev_end = end
        if end == seq_len:
            break
    return out


def rolling_windows(tokens: int, max_length: int) -> list[Window]:
    """lm-eval's rolling windows over ``seq = [prefix] + ids`` (``tokens`` = len(ids)): each
    predicts up to ``max_length`` new tokens from an input of at most ``max_length`` tokens."""
    out, done = [], 0
    while done < tokens:
        end = done + min(max_length, tokens - done)  # predicts ids[done:end] = seq[done + 1:end + 1]
        out.append(Window(max(0, end - max_length), end, done + 1, end + 1))
        done = end
    return out


def perplexity(model, ids: torch.Tensor, max_length: int, stride: int, batch_size: int,
               keep_positions: int = 0, windowing: str = "strided", prefix_token: int | None = None
               ) -> PerplexityResult:
    """``ids``: 1-D token ids of the whole corpus. ``rolling`` needs ``prefix_token``."""
    if windowing == "rolling":
        seq = torch.cat([torch.tensor([prefix_token], dtype=ids.dtype), ids])
        all_windows = rolling_windows(ids.numel(), max_length)
    else:
        seq, all_windows = ids, windows(ids.numel(), max_length, stride)
    result = PerplexityResult(0.0, 0, 0)
    for start in range(0, len(all_windows), batch_size):
        for same in _same_length(all_windows[start:start + batch_size]):
            batch = torch.stack([seq[w.begin:w.end] for w in same]).to(input_device(model))
            with torch.inference_mode():
                logits = model(input_ids=batch).logits.float()
            for row, w in enumerate(same):
                lp = torch.log_softmax(logits[row, w.first - 1 - w.begin:w.last - 1 - w.begin], dim=-1)
                tok = seq[w.first:w.last].to(lp.device)
                result.nll_sum -= float(lp.gather(-1, tok.unsqueeze(-1)).sum())
                result.scored_tokens += w.targets
                result.windows += 1
                kept = sum(t.shape[0] for t in result.logprobs)
                if kept < keep_positions:
                    result.logprobs.append(lp[: keep_positions - kept].cpu())
    return result


def _same_length(group: list[Window]) -> list[list[Window]]:
    by_len: dict[int, list[Window]] = {}
    for w in group:
        by_len.setdefault(w.end - w.begin, []).append(w)
    return list(by_len.values())
