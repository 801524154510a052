"""Float8 weights with one scale per output row, as plain tensors the decode step's compiler fuses.

A Linear layer's weight ``W`` (out × in) becomes ``q = round_e4m3(W / s)`` with ``s = max|W_row| / 448``
(448: e4m3's largest finite value) and the layer computes ``(x @ q.T) · s`` — the float8 values are
exact in bfloat16, the matmul accumulates in float32, the row scale multiplies the result.

Why our own 30 lines rather than torchao's weight-only float8: both store the same bytes, but
torchao's dequantizes the whole weight (``q · s``, transposed) before a matmul, and compiled, that
kept inductor from fusing it into the batch-1 matrix-vector kernel for some shapes: on an H200
(torch 2.11, torchao 0.18) its `down_proj` and `lm_head` products took 467 µs and 4.1 ms where this
form took 21 µs and 119 µs (benchmarks/fp8_linear_bench.py). Written as ``linear(x, q.to(bf16)) · s``
with plain tensors, inductor turns a one-row product into one reduction kernel that reads each float8
weight once (coordinate-descent tuning's matrix-vector rewrite), and the joined q/k/v and gate/up
projections join these weights too.

Eager calls, and compiled ones with several rows (prefill, batched decode), convert the weight to
the activation dtype before a dense matmul: correct everywhere, fast only for one row per step.
"""

from __future__ import annotations

from typing import Any

import torch

FORMAT = torch.float8_e4m3fn
LARGEST = float(torch.finfo(FORMAT).max)  # 448.0


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 rows and their float32 scales (a row of zeros keeps scale 1: nothing to divide)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / LARGEST
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale[:, None]).clamp(-LARGEST, LARGEST).to(FORMAT), scale


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ dequantized(weight).T + bias``, the row scale applied to the float32 result."""
    out = (torch.nn.functional.linear(x, weight.to(x.dtype)).float() * scale).to(x.dtype)
    return out if bias is None else out + bias


class Float8RowsLinear(torch.nn.Module):
    """A Linear layer whose weight is float8 rows (``weight``) times ``weight_scale`` (float32, one per row)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, layer: torch.nn.Linear) -> "Float8RowsLinear":
        weight, scale = quantize_rows(layer.weight)
        return cls(weight, scale, layer.bias)

    def dequantized(self) -> torch.Tensor:
        """The weight as the matmul sees it, in float32 (for tests and quality checks)."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, float8 rows"


def convert(model: Any, include_head: bool = True) -> int:
    """Replace every ``torch.nn.Linear`` of ``model`` in place (the output head too unless
    ``include_head`` is false; its weight is then left tied or dense). Returns how many were replaced."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and (include_head or child is not head):
                setattr(parent, name, Float8RowsLinear.from_linear(child))
                replaced += 1
    return replaced
