"""Projections that read one input, run as one matmul inside the compiled decode step.

A decoder layer multiplies the same normed hidden state by q, k and v, and by gate and up. As
separate matmuls each is narrow — for tensor parallel, a rank's slice of it narrower still — and
cuBLAS runs narrow matmuls split-K with a reduction kernel of their own (the TP2 batch-32 profile
in BENCHMARKS.md). One matmul over the joined weights reads the same bytes in fewer, fuller kernels.

How, without touching any model's code:

- each group's weights are concatenated once into one tensor, and each projection's ``weight``
  becomes a view of its rows (no second copy; eager calls — the prefill, evaluate — run as before);
- while ``torch.compile`` traces, every projection of a group computes the *whole* joined matmul
  and keeps its own columns; the compiled graph then holds the same matmul two or three times;
- ``MergeRepeatedOps`` (an inductor post-grad pass, given in the step's compile options) keeps one
  of each repeated pure op, so one joined matmul remains.

inductor's freezing joins such matmuls too, but it copies the weights into constants, in torch 2.11
joins only weights of equal shape (gate/up, not q/k/v), and at batch 1 made the step slower.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

# sibling projections that read one input (Llama, Mistral, Qwen2/3, Gemma, Phi-3's unpacked kin)
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class JoinedSlice(torch.nn.Linear):
    """Columns ``lo:hi`` of a joined projection; its ``weight`` is a view of the joined weight."""

    lo: int
    hi: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # repeated across the group; MergeRepeatedOps keeps one
            return torch.nn.functional.linear(x, self.joined_weight, self.joined_bias)[..., self.lo:self.hi]
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _joinable(modules: list[Any]) -> bool:
    """Plain linear layers with plain weights (not quantized tensors, not DTensors) of one input
    width, dtype and device, all with a bias or none."""
    if not all(type(m) is torch.nn.Linear and type(m.weight.data) is torch.Tensor for m in modules):
        return False
    first = modules[0].weight
    return (all(m.weight.shape[1] == first.shape[1] and m.weight.dtype == first.dtype
                and m.weight.device == first.device and first.device.type != "meta" for m in modules)
            and len({m.bias is None for m in modules}) == 1)


def _join(modules: list[torch.nn.Linear]) -> None:
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])
    lo = 0
    for m in modules:
        hi = lo + m.weight.shape[0]
        m.__class__ = JoinedSlice
        m.lo, m.hi = lo, hi
        # buffers, so dynamo treats them as the model's own static tensors (a CUDA graph never copies them)
        m.register_buffer("joined_weight", weight, persistent=False)
        m.register_buffer("joined_bias", bias, persistent=False)
        m.weight = torch.nn.Parameter(weight[lo:hi], requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[lo:hi], requires_grad=False)
        lo = hi


def join(model: Any) -> list[str]:
    """Join every group of ``GROUPS`` found in ``model``, in place (idempotent). Returns the groups
    joined, each once (e.g. ``["q_proj+k_proj+v_proj", "gate_proj+up_proj"]``); empty: none."""
    joined = set()
    for parent in model.modules():
        children = dict(parent.named_children())
        for group in GROUPS:
            modules = [children.get(name) for name in group]
            if all(isinstance(m, JoinedSlice) for m in modules):
                joined.add("+".join(group))
            elif all(m is not None for m in modules) and _joinable(modules):
                _join(modules)
                joined.add("+".join(group))
    return [g for g in ("+".join(group) for group in GROUPS) if g in joined]


def _pure_ops() -> frozenset:
    aten = torch.ops.aten
    return frozenset((aten.mm.default, aten.addmm.default, aten.bmm.default, aten.permute.default,
                      aten.t.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
                      aten.expand.default))


def _key(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    return value


class MergeRepeatedOps(CustomGraphPass):
    """inductor post-grad pass: a pure op (matmul, view, transpose) with the same inputs as an earlier
    one, with no write in between, is replaced by it. inductor does not do this itself in inference
    graphs; the joined projections rely on it."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        pure, seen = _pure_ops(), {}
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            schema = getattr(node.target, "_schema", None)
            if schema is not None and schema.is_mutable:
                seen.clear()  # an op that writes (a cache update): what follows may read new values
            if node.target not in pure:
                continue
            key = (node.target, _key(node.args), _key(node.kwargs))
            earlier = seen.setdefault(key, node)
            if earlier is not node:
                node.replace_all_uses_with(earlier)
                graph.erase_node(node)

    def uuid(self) -> str:  # the same pass on every call: inductor's cache may reuse what it compiled
        return "optipipe.MergeRepeatedOps.1"
