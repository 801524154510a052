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

Float8 rows (quantize=fp8_weight_only, stages/float8_rows.py) join the same way: their float8 rows
and row scales are concatenated, and the dequantizing ops repeated with the matmul merge with it.

inductor's freezing joins such matmuls too, but it copies the weights into constants, in torch 2.11
joins only weights of equal shape (gate/up, not q/k/v), and at batch 1 made the step slower.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from stages import float8_rows

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


class JoinedFloat8Slice(float8_rows.Float8RowsLinear):
    """Rows ``lo:hi`` of a joined float8-rows projection: ``weight`` and ``weight_scale`` are views."""

    lo: int
    hi: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # repeated across the group; MergeRepeatedOps keeps one
            return float8_rows.linear(x, self.joined_weight, self.joined_scale, self.joined_bias)[..., self.lo:self.hi]
        return float8_rows.linear(x, self.weight, self.weight_scale, self.bias)


# the layer classes that join, each with the class its slices become
SLICE_OF = {torch.nn.Linear: JoinedSlice, float8_rows.Float8RowsLinear: JoinedFloat8Slice}
# each joined tensor's buffer, read by the slices' compiled forward (None where the layers have none)
JOINED_BUFFERS = {"weight": "joined_weight", "weight_scale": "joined_scale", "bias": "joined_bias"}


def _joinable(modules: list[Any]) -> bool:
    """Linear layers of one kind (plain, or float8 rows) with plain weights (not quantized tensor
    subclasses, not DTensors) of one input width, dtype and device, all with a bias or none."""
    kinds = {type(m) for m in modules}
    if len(kinds) != 1 or kinds.pop() not in SLICE_OF or not all(type(m.weight.data) is torch.Tensor for m in modules):
        return False
    first = modules[0].weight
    return (all(m.weight.shape[1] == first.shape[1] and m.weight.dtype == first.dtype
                and m.weight.device == first.device and first.device.type != "meta" for m in modules)
            and len({m.bias is None for m in modules}) == 1)


def _join(modules: list[Any]) -> None:
    """Concatenate the group's rows (weight, float8 rows' scales, bias) once; each layer becomes a slice."""
    slice_class = SLICE_OF[type(modules[0])]
    names = ["weight"] + (["weight_scale"] if slice_class is JoinedFloat8Slice else [])
    names += [] if modules[0].bias is None else ["bias"]
    joined = {name: torch.cat([getattr(m, name).detach() for m in modules]) for name in names}
    lo = 0
    for m in modules:
        hi = lo + m.weight.shape[0]
        m.__class__ = slice_class
        m.lo, m.hi = lo, hi
        for name, buffer in JOINED_BUFFERS.items():
            # buffers, so dynamo treats them as the model's own static tensors (a CUDA graph never copies them)
            m.register_buffer(buffer, joined.get(name), persistent=False)
            if name in joined:
                setattr(m, name, torch.nn.Parameter(joined[name][lo:hi], requires_grad=False))
        lo = hi


def join(model: Any) -> list[str]:
    """Join every group of ``GROUPS`` found in ``model``, in place (idempotent). Returns the groups
    joined, each once (e.g. ``["q_proj+k_proj+v_proj", "gate_proj+up_proj"]``); empty: none."""
    joined = set()
    for parent in model.modules():
        children = dict(parent.named_children())
        for group in GROUPS:
            modules = [children.get(name) for name in group]
            if all(isinstance(m, (JoinedSlice, JoinedFloat8Slice)) for m in modules):
                joined.add("+".join(group))
            elif all(m is not None for m in modules) and _joinable(modules):
                _join(modules)
                joined.add("+".join(group))
    return [g for g in ("+".join(group) for group in GROUPS) if g in joined]


def _pure_ops() -> frozenset:
    aten = torch.ops.aten
    # float8 rows: each repeated matmul comes with its weight's conversion and the row scale's multiply
    return frozenset((aten.mm.default, aten.addmm.default, aten.bmm.default, aten.permute.default,
                      aten.t.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
                      aten.expand.default, aten.mul.Tensor, aten._to_copy.default,
                      torch.ops.prims.convert_element_type.default))


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
        return "optipipe.MergeRepeatedOps.2"
