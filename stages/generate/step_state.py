"""The decode step's inputs and state, each at one address for the life of the static cache.

A CUDA graph reads its inputs from the addresses it was captured with. Inputs that torch.compile does
not know to be static (``reduce-overhead``'s cudagraph trees) are copied into the graph's own
placeholders before every replay, and the graph's outputs, which the next replay overwrites, must be
copied out: the step's eight inputs and four outputs made a dozen small copies around every token
(the profiles' "Memcpy DtoD", about 15 a token). Here every input is a buffer marked static
(``torch._dynamo.mark_static_address``), which the step updates in place — the next token, the
positions, the finished rows, and the generated tokens, written straight into their columns — so a
token is one graph replay and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _static(tensor: torch.Tensor) -> torch.Tensor:
    torch._dynamo.mark_static_address(tensor)
    return tensor


@dataclass
class StepState:
    """``tokens`` (batch, cache length) holds each generated token at its position in the sequence;
    the step writes column ``cache_position + 1``. ``banned`` is the vocabulary mask of tokens the
    step may not choose (EOS until ``min_new_tokens``), cleared in place when they are allowed."""

    token: torch.Tensor  # (batch, 1) the last chosen token
    position: torch.Tensor  # (batch, 1) its position id (from the attention mask, as transformers counts)
    cache_position: torch.Tensor  # (1,) its slot in the cache
    mask: torch.Tensor  # (batch, cache length) the prompt's mask, then ones
    done: torch.Tensor  # (batch,) rows that have emitted EOS
    pad: torch.Tensor  # () the token finished rows emit
    tokens: torch.Tensor  # (batch, cache length)
    banned: torch.Tensor | None = None  # (vocab,) sized by the first prefill's logits (``set_stops``)
    eos: torch.Tensor | None = None  # (number of EOS ids,)

    @classmethod
    def allocate(cls, batch: int, length: int, mask_dtype: torch.dtype, device: torch.device) -> "StepState":
        long = dict(dtype=torch.long, device=device)
        return cls(*(_static(t) for t in (
            torch.zeros(batch, 1, **long), torch.zeros(batch, 1, **long), torch.zeros(1, **long),
            torch.ones(batch, length, dtype=mask_dtype, device=device),
            torch.zeros(batch, dtype=torch.bool, device=device), torch.zeros((), **long),
            torch.zeros(batch, length, **long))))

    def fits(self, batch: int, length: int, mask_dtype: torch.dtype, device: torch.device) -> bool:
        return (tuple(self.tokens.shape), self.mask.dtype, self.tokens.device) == ((batch, length), mask_dtype, device)

    def set_stops(self, vocab: int, eos_token_ids: list[int], pad_token_id: int, ban_eos: bool) -> None:
        """This call's EOS ids, pad token and whether EOS starts banned, written into the buffers
        (new buffers only when the vocabulary or the number of EOS ids differs: then the step
        compiles again)."""
        device = self.tokens.device
        if self.banned is None or self.banned.numel() != vocab:
            self.banned = _static(torch.zeros(vocab, dtype=torch.bool, device=device))
        if self.eos is None or self.eos.numel() != len(eos_token_ids):
            self.eos = _static(torch.zeros(len(eos_token_ids), dtype=torch.long, device=device))
        self.eos.copy_(torch.tensor(eos_token_ids, dtype=torch.long))
        self.pad.fill_(pad_token_id)
        self.banned.zero_()
        if ban_eos:
            self.banned.index_fill_(0, self.eos, True)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """In the decode step's argument order."""
        return (self.token, self.position, self.cache_position, self.mask, self.done, self.banned, self.pad,
                self.eos, self.tokens)
