"""Several processes (launcher=torchrun): tensor parallel, and data parallel with optional TP inside.

Tensor parallel: the architecture's TP plan (transformers') shards attention and MLP weights over
the process group inside ``from_pretrained``; every rank then runs the same tokens and all-reduces
partial results. With ``runtime=optipipe`` (default) the sharded layers then run as plain local
layers with our all-reduce and a vocabulary-parallel head (stages/shard/tp_layers.py);
``runtime=transformers`` keeps transformers' own DTensor layers and NCCL calls (the baseline). Data parallel loads one full replica per process and gives
each replica its own share of the prompts; with ``tp_size`` > 1 each replica is then sharded over
its own ranks (stages/shard/replica_tp.py: transformers cannot shard over part of the group).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Optional

from pipeline.contract import (BaseStage, LoadPlan, Problem, RunContext, StageError, StageResult,
                               quantize_traits)
from pipeline import gpus
from stages.shard import agreed_tuning
from stages.shard.all_reduce import MODES as ALL_REDUCE_MODES, WAITS as FUSE_NORM_WAITS, AllReduce, self_test
from stages.shard.capacity import fits_one_gpu, parameter_bytes
from stages.shard.replica_tp import base_plan, replica_ranks, shard_replica, unsupported_entries, whole_plan
from stages.shard.tp_layers import localize
from stages.settings import TensorParallelConfig, DataParallelConfig

RUNTIMES = ("optipipe", "transformers")


def needs_torchrun(root: Any, what: str, n: int) -> list[Problem]:
    if root.launcher.kind == "torchrun":
        return []
    return [Problem("launcher", f"{what} needs several processes; launcher={root.launcher.kind} runs one",
                    f"launcher=torchrun launcher.nproc_per_node={max(n, 2)}")]


def model_config_class(root: Any) -> tuple[Optional[dict], str, Any]:
    """(architecture fields, model type, transformers config class or None); fields None when the
    shapes are unknown without a download."""
    from transformers import CONFIG_MAPPING

    from stages.load.sources import architecture

    arch = architecture(root.model)
    model_type = (arch or {}).get("model_type", "")
    return arch, model_type, CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None  # lazy: no .get


def tp_model_rules(root: Any, tp: int) -> list[Problem]:
    """The architecture must have a TP plan, and ``tp`` must divide its attention and KV heads."""
    out: list[Problem] = []
    traits = quantize_traits(root)
    if not traits.tp_shardable:
        out.append(Problem("quantize", f"{traits.kernel} layers cannot be sharded by transformers' "
                           "tensor parallel (their quantized weights are not DTensors)",
                           "quantize=none, or shard=data_parallel (one replica per GPU)"))
    arch, model_type, config_class = model_config_class(root)
    if arch is None:  # shapes unknown without a download: transformers will say at load time
        return out
    if config_class is None or not getattr(config_class, "base_model_tp_plan", None):
        out.append(Problem("shard", f"transformers has no tensor-parallel plan for model type "
                           f"{model_type!r}", "shard=data_parallel, or shard=pipeline"))
        return out
    heads = int(arch.get("num_attention_heads") or 0)
    kv = int(arch.get("num_key_value_heads") or heads)
    if heads and (heads % tp or kv % tp):
        fits = [d for d in range(tp, 0, -1) if heads % d == 0 and kv % d == 0]
        out.append(Problem("shard.tp_size", f"tensor parallel over {tp} processes must divide the "
                           f"{heads} attention heads and {kv} KV heads", f"a tensor-parallel size of "
                           f"{fits[0]} (launcher.nproc_per_node / shard.tp_size)"))
    return out


def tp_load_kwargs(tp: int) -> dict[str, Any]:
    """``from_pretrained`` kwargs for a TP plan over every rank, in the API this transformers version
    speaks (DistributedConfig in 5.x; plain kwargs before it). Replicas × TP: replica_tp.py."""
    import transformers

    config_class = getattr(transformers, "DistributedConfig", None)
    if config_class is not None and "tp_size" in inspect.signature(config_class).parameters:
        return {"distributed_config": config_class(tp_size=tp, tp_plan="auto")}
    return {"tp_plan": "auto", "tp_size": tp}


def plan_tensor_parallel(stage: str, plan: LoadPlan, tp_size: Optional[int]) -> None:
    """``tp_size`` None: every process. In the parent (validation, dry run) the kwargs are only
    described; a rank builds them once the process group exists."""
    import torch.distributed as dist

    tp = tp_size or (dist.get_world_size() if dist.is_initialized() else plan.processes)
    if tp > 1 and not dist.is_initialized():
        plan.set(stage, "tp_plan", "auto")
        plan.set(stage, "tp_size", tp)
        return
    if tp == 1:
        # transformers ignores a TP plan over one rank and leaves the model where it loads (the CPU):
        # the one rank holds the whole model on its device, as a one-GPU job does
        plan.set(stage, "device_map", {"": plan.device})
        return
    for key, value in tp_load_kwargs(tp).items():
        plan.set(stage, key, value)


def sharded_parameters(model: Any) -> tuple[int, int]:
    """(parameters this rank holds a shard of, all parameters): proof that TP really sharded the model.
    A shard is a DTensor, or a Linear weight smaller than its layer: transformers slices quantized
    weights (tensor subclasses) into plain local ones as they load."""
    import torch
    from torch.distributed.tensor import DTensor

    sliced = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)
              and tuple(m.weight.shape) != (m.out_features, m.in_features)}
    params = list(model.parameters())
    return sum(isinstance(p, DTensor) or id(p) in sliced for p in params), len(params)


def replica_tp_rules(root: Any) -> list[Problem]:
    """Replicas × TP shard with torch's column-/row-wise styles: other plan entries, and quantized
    weights (tensor subclasses that DTensor cannot split), are refused before launch."""
    out: list[Problem] = []
    if quantize_traits(root).quantizes:
        out.append(Problem("quantize", "replicas × TP shard full-precision weights only",
                           "quantize=none, or shard.tp_size=1 (quantized replicas)"))
    _, model_type, config_class = model_config_class(root)
    if config_class is not None:
        bad = unsupported_entries(base_plan(config_class))
        if bad:
            out.append(Problem("shard.tp_size", f"replicas × TP apply column-/row-wise TP plans only; "
                               f"{model_type} has {', '.join(bad)}", "shard=tensor_parallel, or shard.tp_size=1"))
    return out


def check_sharded(stage: str, model: Any, tp: int) -> dict[str, float]:
    if tp <= 1:
        return {}
    sharded, total = sharded_parameters(model)
    if sharded == 0:
        raise StageError(stage, f"tensor parallel over {tp} processes was asked but no weight is sharded",
                         "check that the model type has a TP plan (shard=data_parallel otherwise)")
    return {"sharded_parameters": float(sharded), "parameters_total": float(total)}


def tp_layer_problems(c: Any, root: Any) -> list[Problem]:
    """The settings of how TP layers run (``TpLayerSettings``), checked for either shard stage."""
    out = []
    if c.runtime not in RUNTIMES:
        out.append(Problem("shard.runtime", f"unknown runtime {c.runtime!r}", "shard.runtime=optipipe|transformers"))
    if c.all_reduce not in ALL_REDUCE_MODES:
        out.append(Problem("shard.all_reduce", f"unknown all-reduce {c.all_reduce!r}",
                           f"shard.all_reduce=<one of {', '.join(ALL_REDUCE_MODES)}>"))
    elif c.all_reduce == "symm_mem" and not root.stages["load"].device().startswith("cuda"):
        out.append(Problem("shard.all_reduce", "symmetric-memory all-reduce needs CUDA GPUs",
                           "shard.all_reduce=auto (falls back to the process group) or load.device=cuda"))
    if c.one_shot_max_kib < 1:
        out.append(Problem("shard.one_shot_max_kib", f"must be ≥ 1, got {c.one_shot_max_kib}",
                           "shard.one_shot_max_kib=1024"))
    if c.fuse_norm_wait not in FUSE_NORM_WAITS:
        out.append(Problem("shard.fuse_norm_wait", f"unknown way to wait {c.fuse_norm_wait!r}",
                           f"shard.fuse_norm_wait=<one of {', '.join(FUSE_NORM_WAITS)}>"))
    return out


def take_over(ctx: RunContext, c: Any, group: Any, rank: int, world: int,
              replicas: list[list[int]] | None = None, whole: dict[str, str] | None = None) -> dict[str, Any]:
    """Our local layers and all-reduce over ``group`` (``rank`` of ``world`` in it) in place of the
    model's TP layers — or, with ``whole``, slices of a whole replica's — checked with a known sum.
    ``replicas``: every replica's ranks (the kernel tuning is agreed within each)."""
    import torch

    device = torch.device(ctx.dist.device)
    reduce = AllReduce(group, device, c.all_reduce, c.one_shot_max_kib * 1024,
                       getattr(ctx.model, "dtype", torch.bfloat16))  # the fused kernel's messages
    reduce.fuse_norm, reduce.push_wait = c.fuse_norm, c.fuse_norm_wait
    if not self_test(reduce, device, rank, world):
        raise StageError("shard", f"the {reduce.kind} all-reduce returned a wrong sum on rank {ctx.dist.rank}",
                         "shard.all_reduce=process_group")
    local = localize(ctx.model, reduce, rank, world, c.vocab_parallel_head, whole_plan=whole,
                     split_greedy=c.split_greedy)
    if local.skipped:
        return {"shard.collective": f"{reduce.fallback} (transformers)", "shard.local_layers": local.skipped}
    out: dict[str, Any] = {"shard.runtime": "optipipe", "shard.collective": reduce.kind, "shard.head": local.head,
                           "local_tp_layers": float(local.layers),
                           "dtensor_parameters_left": float(sharded_parameters(ctx.model)[0])}
    if c.agreed_tuning and world > 1:
        out["shard.kernel_tuning"] = agreed_tuning.install(float(ctx.cfg.launcher.get("collective_timeout_s", 300)),
                                                           replicas)
    if reduce.why_not_symm and c.all_reduce == "auto":
        out["shard.collective_why"] = f"no symmetric memory: {reduce.why_not_symm}"
    return out


def add_taken(taken: dict[str, Any], metrics: dict[str, float], tags: dict[str, str]) -> None:
    """What a TP take-over reported, into the stage's metrics (numbers) and tags (text)."""
    metrics.update({k: v for k, v in taken.items() if not isinstance(v, str)})
    tags.update({k: v for k, v in taken.items() if isinstance(v, str)})


class TensorParallel(BaseStage):
    name: ClassVar[str] = "shard"
    Config: ClassVar[type] = TensorParallelConfig

    def tp(self, world: int) -> int:
        return self.cfg.tp_size or world

    def ranks_per_replica(self, world: int) -> int:
        return self.tp(world)

    def load_split(self, world: int) -> int:
        """Ranks each weight is split over as it loads (transformers shards inside from_pretrained)."""
        return self.tp(world)

    def problems(self, root: Any) -> list[Problem]:
        world = root.launcher.processes
        tp = self.tp(world)
        out = needs_torchrun(root, "shard=tensor_parallel", tp)
        if out:
            return out
        if tp != world:
            out.append(Problem("shard.tp_size", f"tensor parallel uses every process: {world} processes "
                               f"but tp_size={tp}", f"launcher.nproc_per_node={tp}, or shard=data_parallel "
                               f"shard.tp_size={tp} for {world // max(tp, 1)} replicas × TP{tp}"))
        return out + tp_layer_problems(self.cfg, root) + tp_model_rules(root, tp)

    def plan(self, plan: LoadPlan) -> None:
        plan_tensor_parallel(self.name, plan, self.cfg.tp_size)

    def apply(self, ctx: RunContext) -> StageResult:
        tp = self.tp(ctx.dist.world_size)
        metrics = check_sharded(self.name, ctx.model, tp)  # transformers sharded the weights at load
        ctx.facts.tensor_parallel = tp  # generate's roofline: each rank holds 1/tp of the KV cache
        tags = {"shard.mode": "tensor_parallel", "shard.devices": ctx.dist.device, "shard.runtime": "transformers"}
        if tp == 1:  # the 1-process job of a sweep over processes: the whole model, nothing to reduce
            tags.update({"shard.runtime": "none", "shard.collective": "none (one process)"})
        elif self.cfg.runtime == "optipipe":
            import torch.distributed as dist

            taken = take_over(ctx, self.cfg, dist.group.WORLD, ctx.dist.rank, ctx.dist.world_size)
            add_taken(taken, metrics, tags)
        else:
            import torch.distributed as dist

            tags["shard.collective"] = f"{dist.get_backend()} (transformers)"
        summary = "tensor parallel ×1: the whole model on this process's device, nothing to reduce"
        if tp > 1:
            summary = (f"tensor parallel ×{tp}: {metrics.get('sharded_parameters', 0):.0f} of "
                       f"{metrics.get('parameters_total', 0):.0f} weights sharded (rank 0 shown), "
                       f"{tags['shard.runtime']} layers, all-reduce: {tags['shard.collective']}")
        return StageResult(metrics={**metrics, "tp_size": float(tp)}, tags=tags, summary=summary)


class DataParallel(BaseStage):
    name: ClassVar[str] = "shard"
    Config: ClassVar[type] = DataParallelConfig

    def ranks_per_replica(self, world: int) -> int:
        return self.cfg.tp_size

    def problems(self, root: Any) -> list[Problem]:
        world, tp = root.launcher.processes, self.cfg.tp_size
        out = needs_torchrun(root, "shard=data_parallel", 2 * tp)
        if out:
            return out
        if tp < 1 or world % tp:
            return [Problem("shard.tp_size", f"{world} processes do not split into replicas of tp_size={tp}",
                            f"launcher.nproc_per_node={2 * max(tp, 1)} (processes = replicas × tp_size)")]
        if tp > 1:
            out += tp_layer_problems(self.cfg, root) + tp_model_rules(root, tp) + replica_tp_rules(root)
        if root.stages["load"].device().startswith("cuda"):  # each rank loads its replica whole first
            problem = fits_one_gpu(parameter_bytes(root), gpus.memory_bytes())
            out += [problem] if problem else []
        return out

    def plan(self, plan: LoadPlan) -> None:
        # a full replica on this rank's device; with tp_size > 1 apply() then shards it over the replica
        plan.set(self.name, "device_map", {"": plan.device})

    def apply(self, ctx: RunContext) -> StageResult:
        tp, world = self.cfg.tp_size, ctx.dist.world_size
        replicas, index = world // tp, ctx.dist.rank // tp
        ctx.facts.replica = (index, replicas)  # generate takes this replica's share of the prompts
        metrics: dict[str, float] = {}
        tags = {"shard.mode": "data_parallel", "shard.devices": ctx.dist.device}
        if tp > 1:
            ctx.facts.tensor_parallel = tp  # generate's roofline: each rank holds 1/tp of its replica
            taken = self._our_layers(ctx, tp) if self.cfg.runtime == "optipipe" else self._dtensor_layers(ctx, tp)
            add_taken(taken, metrics, tags)
        return StageResult(metrics={**metrics, "replicas": float(replicas), "tp_size": float(tp)}, tags=tags,
                           summary=f"data parallel: {replicas} replica(s)" + (
                               f" × TP{tp}, {tags['shard.runtime']} layers, all-reduce: {tags['shard.collective']}"
                               if tp > 1 else ""))

    def _dtensor_layers(self, ctx: RunContext, tp: int) -> dict[str, Any]:
        """torch's DTensor layers: they reduce through the process group's backend, eagerly."""
        import torch.distributed as dist

        shard_replica(ctx.model, ctx.dist.device.split(":")[0], ctx.dist.world_size, tp)
        return {**check_sharded(self.name, ctx.model, tp), "shard.runtime": "transformers",
                "shard.collective": f"{dist.get_backend()} (DTensor)"}

    def _our_layers(self, ctx: RunContext, tp: int) -> dict[str, Any]:
        """Each rank keeps its slices of the whole replica it loaded; the replica's ranks reduce over
        a group of their own (one-shot symmetric memory where the GPUs share memory)."""
        import torch.distributed as dist

        ranks = replica_ranks(ctx.dist.world_size, tp)
        group = dist.new_subgroups_by_enumeration(ranks)[0]  # a collective: every rank creates every group
        taken = take_over(ctx, self.cfg, group, ctx.dist.rank % tp, tp, replicas=ranks, whole=whole_plan(ctx.model))
        if "local_tp_layers" not in taken:
            raise StageError(self.name, f"replicas × TP found no layer of the model's TP plan to shard "
                             f"({taken.get('shard.local_layers')})", "shard.runtime=transformers, or shard.tp_size=1")
        return taken
