"""Decode-step attention for grouped-query models that reads each key/value head once.

With a padding mask (and the fast engine always has one: its static cache is longer than what is
filled), transformers' SDPA path cannot use ``enable_gqa`` and under ``torch.compile`` copies every
key/value head ``heads // kv_heads`` times (``repeat_kv``) before attending. At batch 32 on an 8B
Llama shape that copy and the attention over it were 43 % of the decode step's GPU time (H200
profile, BENCHMARKS.md). For one query token the copy is avoidable: the query heads that share a key/value
head are laid out as that head's rows of queries, ``(batch, kv_heads, group, dim)``, and one SDPA call
attends them all to the one key/value head — or, with ``generate.fast_decode_attention=split_kv``
on CUDA, our kernel that also splits the cache's length over thread blocks (split_kv_decode.py).
Anything else (prefill, MHA, soft-capping, sinks, per-head masks) goes to transformers' own SDPA
function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline import measure
from stages.attention.split_kv_decode import decode_attention, reserve_counts

NAME = "optipipe_gqa_decode"
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")
SDPA, SPLIT_KV = "sdpa", "split_kv"  # the kernel a decode step attends with (generate.fast_decode_attention)
KERNELS = (SDPA, SPLIT_KV)
_KERNEL = [SDPA]  # while a GqaDecodeAttention is open: its kernel


def _sdpa() -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def gqa_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Same contract as transformers' ``sdpa_attention_forward``: (batch, q_len, heads, dim), None."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    plain = (q_len != 1 or heads == kv_heads or dropout or key.shape[-1] != value.shape[-1]
             or any(kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS)
             or (attention_mask is not None and attention_mask.shape[1] != 1))
    if plain:
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    # query head h uses key/value head h // group (repeat_kv's order), so a reshape groups them
    packed = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    if _KERNEL[0] == SPLIT_KV and (attention_mask is None
                                   or attention_mask.shape[-1] == key.shape[2]):
        out = decode_attention(packed, key, value, attention_mask, dim ** -0.5 if scaling is None else scaling)
        return out.reshape(batch, 1, heads, value.shape[-1]), None  # (batch, kv_heads, group, dim) is head order
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, scale=scaling,
                                         is_causal=False)  # the mask holds causality; rows are heads here
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``NAME`` a valid ``attn_implementation`` whose masks are built as SDPA's are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, gqa_decode_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return NAME


class GqaDecodeAttention:
    """While open, a model that uses SDPA uses ``gqa_decode_attention`` instead (restored on exit,
    so stages after generate see the user's choice). Other implementations are left alone."""

    def __init__(self, model: Any, kernel: str = SDPA) -> None:
        self.config = model.config
        self.before = getattr(self.config, "_attn_implementation", None)
        self.active = self.before == "sdpa" and _is_gqa(self.config)
        self.kernel = kernel  # SDPA on the packed heads, or SPLIT_KV (stages/attention/split_kv_decode.py; CUDA)
        self.device = measure.parameter_device(model)  # where its cache lives

    def __enter__(self) -> "GqaDecodeAttention":
        if self.active:
            self.config._attn_implementation = register()
            _KERNEL[0] = self.kernel
            if self.kernel == SPLIT_KV and self.device.type == "cuda":
                reserve_counts(self.device)  # before the compile and the capture (split_kv_decode.py)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self.config._attn_implementation = self.before
            _KERNEL[0] = SDPA


def _is_gqa(config: Any) -> bool:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, kv_heads = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    return bool(heads and kv_heads and kv_heads < heads)
