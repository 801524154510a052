"""One-process placements: ``single`` (one device) and ``pipeline`` (accelerate: layers spread out)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from pipeline.contract import (BaseStage, LoadPlan, NoSettings, Problem, RunContext, StageError,
                               StageResult, warning)
from stages.settings import PipelinePlacementConfig


def one_process_only(root: Any, option: str) -> list[Problem]:
    n = root.launcher.processes
    if n == 1:
        return []
    return [Problem("shard", f"shard={option} is one process, but the launcher starts {n}: each would "
                    "run the whole job on its own", "shard=data_parallel (one replica per process), "
                    "shard=tensor_parallel, or launcher=local")]


class Single(BaseStage):
    name: ClassVar[str] = "shard"
    Config: ClassVar[type] = NoSettings

    def problems(self, root: Any) -> list[Problem]:
        return one_process_only(root, "single")

    def plan(self, plan: LoadPlan) -> None:
        plan.set(self.name, "device_map", {"": plan.device})

    def apply(self, ctx: RunContext) -> StageResult:
        devices = sorted({str(p.device) for p in ctx.model.parameters()})
        if len(devices) != 1:
            raise StageError(self.name, f"expected every weight on one device, found {devices}")
        return StageResult(tags={"shard.devices": devices[0]}, summary=f"one device: {devices[0]}")


PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")


class PipelinePlacement(BaseStage):
    """accelerate big-model placement: layers spread over GPUs, then CPU, then disk, in order.

    One forward pass visits the devices one after another (no overlap), so this is for models that
    do not fit one device, not for speed.
    """

    name: ClassVar[str] = "shard"
    Config: ClassVar[type] = PipelinePlacementConfig

    def problems(self, root: Any) -> list[Problem]:
        c, out = self.cfg, one_process_only(root, "pipeline")
        if c.device_map not in PLACEMENTS:
            out.append(Problem("shard.device_map", f"unknown placement {c.device_map!r}",
                               f"shard.device_map=<one of {', '.join(PLACEMENTS)}>"))
        for key in c.max_memory or {}:
            if key != "cpu" and not str(key).isdigit():
                out.append(Problem("shard.max_memory", f"key {key!r} is neither a GPU index nor 'cpu'",
                                   "'shard.max_memory={0: 20GiB, cpu: 64GiB}'"))
        gpus = torch.cuda.device_count()
        limits_cpu = "cpu" in (c.max_memory or {}) or c.offload_folder
        if gpus <= 1 and not limits_cpu:
            out.append(warning("shard", f"pipeline placement over {max(gpus, 1)} device(s) without CPU or "
                               "disk offload puts the whole model on one device", "shard=single, or set "
                               "shard.max_memory / shard.offload_folder"))
        return out

    def plan(self, plan: LoadPlan) -> None:
        plan.set(self.name, "device_map", self.cfg.device_map)
        if self.cfg.max_memory:
            plan.set(self.name, "max_memory", {(int(k) if str(k).isdigit() else k): v
                                                for k, v in self.cfg.max_memory.items()})
        if self.cfg.offload_folder:
            plan.set(self.name, "offload_folder", self.cfg.offload_folder)

    def apply(self, ctx: RunContext) -> StageResult:
        # transformers keeps no map when everything landed on one device
        placement = getattr(ctx.model, "hf_device_map", None) or {"": str(ctx.model.device)}
        modules: dict[str, int] = {}
        for device in placement.values():
            key = f"cuda{device}" if isinstance(device, int) else str(device)
            modules[key] = modules.get(key, 0) + 1
        summary = ", ".join(f"{n} modules on {d}" for d, n in sorted(modules.items()))
        return StageResult(metrics={f"modules_{d}": float(n) for d, n in modules.items()},
                           tags={"shard.placement": summary, "shard.devices": ",".join(sorted(modules))},
                           summary=f"accelerate {self.cfg.device_map}: {summary}")
