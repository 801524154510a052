"""Tensor parallel inside each data-parallel replica (replicas × TP).

transformers shards over the whole process group and has no inference-ready way to shard over a
part of it: 5.17 has no replica size at all, and 5.24's ``dp_replicate_size`` wraps the replicas in
FSDP2, whose forward fails under inference mode ("Inference tensors do not track version counter"
with 4 gloo ranks). So a replica of ``tp`` ranks is loaded whole on each rank's
device and then sharded here over its own ranks, with the architecture's TP plan from transformers
(its column-/row-wise entries) applied either by ``torch.distributed.tensor.parallel.parallelize_module``
(``shard.runtime=transformers``: DTensor layers, the process group's collectives, eager) or by our
local layers over the replica's own group (``shard.runtime=optipipe``: stages/shard/tp_layers.py,
the one-shot all-reduce where GPUs share memory, and a vocabulary-parallel head). The embedding and
norms stay whole on every rank.
"""

from __future__ import annotations

from typing import Any

STYLES = ("colwise", "rowwise")


def base_plan(config_class: Any) -> dict[str, str]:
    return dict(getattr(config_class, "base_model_tp_plan", None) or {})


def unsupported_entries(plan: dict[str, str]) -> list[str]:
    """Plan entries this module cannot apply (anything but plain column-/row-wise linears)."""
    return [f"{name}: {style}" for name, style in plan.items() if style not in STYLES]


def replica_mesh(device_type: str, world: int, tp: int) -> Any:
    """The ``tp`` ranks of this rank's replica (ranks r·tp … r·tp+tp−1, as the prompts are split)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("replica", "tp"))["tp"]


def replica_ranks(world: int, tp: int) -> list[list[int]]:
    """The ranks of every replica, in the order the prompts are split (replica r: r·tp … r·tp+tp−1)."""
    return [list(range(r * tp, (r + 1) * tp)) for r in range(world // tp)]


def whole_plan(model: Any) -> dict[str, str]:
    """The architecture's TP plan in ``model``'s own module names (its entries are the base model's)."""
    from pipeline.contract import StageError

    plan = base_plan(type(model.config.get_text_config()))
    bad = unsupported_entries(plan)
    if not plan or bad:
        raise StageError("shard", f"replicas × TP apply column-/row-wise TP plans only; this model's plan "
                         f"has {', '.join(bad) or 'no entry'}", "shard=tensor_parallel over every process, "
                         "or shard.tp_size=1")
    return {f"{model.base_model_prefix}.{name}": kind for name, kind in plan.items()}


def shard_replica(model: Any, device_type: str, world: int, tp: int) -> None:
    """Shard ``model`` (whole, on this rank's device) over its replica's ranks with DTensor, in place."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    style = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    parallelize_module(model, replica_mesh(device_type, world, tp),
                       {name: style[kind]() for name, kind in whole_plan(model).items()})
