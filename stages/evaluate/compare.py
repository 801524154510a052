"""How close an optimized model stays to its reference: agreement and KL divergence."""

from __future__ import annotations

import torch

TOP_K = 64  # reference log-probs kept per position (the cache stays small; see coarse_kl)


def top_k(logprobs: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = logprobs.topk(k, dim=-1)
    return values, indices


def coarse_kl(ref_values: torch.Tensor, ref_indices: torch.Tensor, opt_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ opt) over the reference's top-k tokens plus one bucket for all other tokens.

    Merging tokens can only lower a KL divergence, so this is a lower bound of the full KL; with
    k=64 the bucket typically holds a few percent of the mass. Returns one value per position.
    """
    p = ref_values.exp()
    q_log = opt_logprobs.gather(-1, ref_indices)
    head = (p * (ref_values - q_log)).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp(min=1e-12)
    q_rest = (1 - q_log.exp().sum(-1)).clamp(min=1e-12)
    return (head + p_rest * (p_rest.log() - q_rest.log())).clamp(min=0)  # ≥ 0 up to rounding


def prefix_agreement(reference: list[list[int]], optimized: list[list[int]]) -> float:
    """Mean share of each greedy continuation that matches the reference before the first difference."""
    shares = []
    for ref, opt in zip(reference, optimized):
        n = 0
        for a, b in zip(ref, opt):
            if a != b:
                break
            n += 1
        shares.append(n / max(len(ref), 1))
    return sum(shares) / max(len(shares), 1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
