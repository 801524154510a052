"""Tensor-parallel layers as plain local tensors, each followed by one chosen all-reduce.

transformers shards the weights inside ``from_pretrained`` (memory-efficient: a rank reads only its
slices) and then runs every sharded layer through DTensor wrappers and NCCL. After the load this
module takes over the layers of the plan: the DTensor weights become the plain tensors of this
rank's shard, transformers' per-layer forward wrappers go, and

- column-wise layers (q/k/v, gate/up) are plain ``Linear`` layers over this rank's output slice;
- row-wise layers (attention output, down projection) sum their partial products with
  ``AllReduce`` (one-shot symmetric memory on NVLink GPUs, the process group elsewhere);
- the output head keeps only this rank's slice of the vocabulary, so no rank reads the whole
  head; one all-reduce of zero-padded logits (each rank fills its own columns) assembles them —
  or, for a greedy decode step, each rank picks its best token and one all-reduce of a few bytes
  per row picks among them;
- an embedding sharded over the vocabulary is gathered whole once: a lookup reads a few rows, so
  a whole copy costs memory (1 GB for Llama-3-8B) but no time, and saves an all-reduce per step.

A plan with any other style (embeddings sharded over the vocabulary, MoE experts, packed layers)
is left to transformers as it is: ``localize`` changes nothing and says why.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from stages.shard.all_reduce import AllReduce

COLUMN, ROW, HEAD, EMBEDDING = "colwise", "rowwise", ("colwise_gather_output", "colwise_rep"), "embedding_rowwise"


class RowParallelLinear(torch.nn.Linear):
    """This rank's slice of the input features; the partial products are summed over the group
    and the bias (whole on every rank) added once after the sum."""

    reduce: AllReduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reduce(torch.nn.functional.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelHead(torch.nn.Linear):
    """Rank r holds rows ``first`` = r·⌈vocab/world⌉ … of the vocabulary (torch's chunk split, as
    transformers shards); returns the full logits, or while ``local_logits()`` is open this rank's
    columns only — for a greedy choice that needs no logits gathered (``greedy``)."""

    reduce: AllReduce
    vocab: int
    first: int
    full_logits: bool = True
    split_greedy: bool = True  # False: greedy steps gather the logits (shard.split_greedy=false, to compare)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = torch.nn.functional.linear(x, self.weight, self.bias)
        if not self.full_logits:
            return local
        return torch.ops.optipipe.tp_gather_columns(local, self.reduce.name, self.vocab)

    @contextmanager
    def local_logits(self) -> Iterator[None]:
        self.full_logits = False
        try:
            yield
        finally:
            self.full_logits = True

    def greedy(self, local: torch.Tensor, banned: torch.Tensor) -> torch.Tensor:
        """The argmax over the whole vocabulary of (rows, this rank's columns) logits, ``banned`` (a
        full-vocabulary mask) excluded: each rank's best, then one all-reduce of a few bytes per row
        instead of gathering every logit (8 MiB per step at batch 32 for a 128k vocabulary)."""
        if local.shape[-1] == 0:  # an uneven split can leave the last rank no columns
            rows = local.shape[:-1]
            value, index = local.new_full(rows, float("-inf")), local.new_zeros(rows, dtype=torch.long)
        else:
            local = local.masked_fill(banned[self.first:self.first + local.shape[-1]], float("-inf"))
            value, index = local.max(-1)
        return torch.ops.optipipe.tp_argmax(value.float(), index + self.first, self.reduce.name)


@dataclass
class LocalTp:
    """What ``localize`` did: counts that prove it, and why it did nothing when it did not."""

    column: int = 0
    row: int = 0
    head: str = "replicated"  # vocab_parallel | replicated
    skipped: str = ""  # non-empty: the model was left to transformers' own TP, and why

    @property
    def layers(self) -> int:
        return self.column + self.row + (self.head == "vocab_parallel")


def split_head(model: Any) -> VocabParallelHead | None:
    """``model``'s vocabulary-parallel head, when it has one whose indices a float32 holds exactly
    (every vocabulary below 16.7 M tokens) and that may: ``VocabParallelHead.greedy`` chooses through it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    usable = isinstance(head, VocabParallelHead) and head.split_greedy and head.vocab <= 1 << 24
    return head if usable else None


def holds_shards(model: Any) -> bool:
    """Whether ``model`` runs our tensor-parallel layers (``localize`` took it over): its row-wise
    layers sum over ranks, so each decode step holds all-reduces."""
    return any(isinstance(m, RowParallelLinear) for m in model.modules())


def plan_style(name: str, plan: dict[str, str]) -> str | None:
    """The plan's style for module ``name`` (layer numbers written as ``*`` in the plan)."""
    return plan.get(name) or plan.get(re.sub(r"\.\d+(?=\.|$)", ".*", name))


def _local(p: torch.nn.Parameter | None) -> torch.nn.Parameter | None:
    from torch.distributed.tensor import DTensor

    if p is None:
        return None
    data = p.to_local() if isinstance(p, DTensor) else p.data
    return torch.nn.Parameter(data.detach(), requires_grad=False)


def _unwrap(module: torch.nn.Module, whole: bool = False) -> None:
    """Drop transformers' per-instance forward wrapper and make the weights plain tensors: this
    rank's shard, or (``whole``) the full tensor gathered from every rank."""
    from torch.distributed.tensor import DTensor

    module.__dict__.pop("forward", None)
    for key in ("weight", "bias"):
        p = module._parameters.get(key)
        if whole and isinstance(p, DTensor):
            module._parameters[key] = torch.nn.Parameter(p.full_tensor().detach(), requires_grad=False)
        elif key in module._parameters:
            module._parameters[key] = _local(p)


def _chunk(whole: torch.Tensor, rank: int, world: int, dim: int = 0) -> torch.Tensor:
    """This rank's part of ``whole`` along ``dim`` (torch's chunk split, as DTensor shards: the last
    rank may get fewer), as its own contiguous tensor."""
    size = whole.shape[dim]
    chunk = -(-size // world)
    start = min(rank * chunk, size)
    return whole.narrow(dim, start, min(chunk, size - start)).clone()


def _split(module: torch.nn.Linear, style: str, rank: int, world: int) -> None:
    """Keep this rank's slice of a whole linear layer: output rows (column-wise) or input columns
    (row-wise, whose bias stays whole: it is added once after the sum)."""
    module.weight = torch.nn.Parameter(_chunk(module.weight.data, rank, world, 0 if style == COLUMN else 1),
                                       requires_grad=False)
    if style == COLUMN and module.bias is not None:
        module.bias = torch.nn.Parameter(_chunk(module.bias.data, rank, world), requires_grad=False)


def _head(module: torch.nn.Linear, reduce: AllReduce, rank: int, world: int, vocab: int) -> None:
    from torch.distributed.tensor import DTensor

    weight = module._parameters["weight"]
    if isinstance(weight, DTensor):  # transformers already kept only this rank's rows
        _unwrap(module)
    else:  # a whole head (untied here: the embedding keeps the full matrix it may share)
        module.__dict__.pop("forward", None)
        module.weight = torch.nn.Parameter(_chunk(weight.data, rank, world), requires_grad=False)
        if module.bias is not None:
            module.bias = torch.nn.Parameter(_chunk(module.bias.data, rank, world), requires_grad=False)
    module.__class__ = VocabParallelHead
    module.reduce, module.vocab, module.first = reduce, vocab, min(rank * -(-vocab // world), vocab)
    module.out_features = module.weight.shape[0]
    # on the instance from the start: local_logits() sets it there, and a compiled graph traced while it
    # was still the class's (the prefill) guards on its absence and compiles again on the next call
    module.full_logits = True


def _supported(module: torch.nn.Module, style: str) -> bool:
    if style == EMBEDDING:
        return isinstance(module, torch.nn.Embedding)
    return style in (COLUMN, ROW, *HEAD) and isinstance(module, torch.nn.Linear)


def localize(model: Any, reduce: AllReduce, rank: int, world: int, vocab_parallel_head: bool = True,
             whole_plan: dict[str, str] | None = None, split_greedy: bool = True) -> LocalTp:
    """Take over the TP plan's layers of ``model`` (loaded by transformers' TP), in place. With
    ``whole_plan`` (module names → styles) the model was loaded whole (a replica of replicas × TP):
    each layer of that plan keeps this rank's slice here; ``rank``/``world`` are the replica's."""
    plan = dict(whole_plan if whole_plan is not None else getattr(model, "tp_plan", None) or {})
    chosen = [(m, plan_style(n, plan)) for n, m in model.named_modules() if plan_style(n, plan)]
    report = LocalTp()
    unknown = sorted({s for m, s in chosen if not _supported(m, s)})
    if not chosen or unknown:
        report.skipped = (f"plan styles {', '.join(unknown)} are transformers' own" if unknown
                          else "the model has no tensor-parallel plan")
        return report
    head = model.get_output_embeddings() if vocab_parallel_head else None
    for module, style in chosen:
        if module is head or style in HEAD:  # the head: below, or left to transformers' gather
            continue
        _unwrap(module, whole=style == EMBEDDING)
        if style == EMBEDDING:
            continue
        if whole_plan is not None:
            _split(module, style, rank, world)
        if style == ROW:
            module.__class__ = RowParallelLinear
            module.reduce = reduce
            module.in_features = module.weight.shape[1]
            report.row += 1
        else:
            module.out_features = module.weight.shape[0]
            report.column += 1
    if isinstance(head, torch.nn.Linear):
        _head(head, reduce, rank, world, int(head.weight.shape[0]))  # a DTensor's shape is the global one
        head.split_greedy = split_greedy
        report.head = "vocab_parallel"
    return report
