"""shard stage: where the weights live. ``single``: the whole model on the load device."""

from __future__ import annotations

from typing import ClassVar

from pipeline.contract import BaseStage, LoadPlan, NoSettings, RunContext, StageError, StageResult


class Single(BaseStage):
    name: ClassVar[str] = "shard"
    Config: ClassVar[type] = NoSettings

    def plan(self, plan: LoadPlan) -> None:
        plan.set(self.name, "device_map", {"": plan.device})

    def apply(self, ctx: RunContext) -> StageResult:
        devices = sorted({str(p.device) for p in ctx.model.parameters()})
        if len(devices) != 1:
            raise StageError(self.name, f"expected every weight on one device, found {devices}")
        return StageResult(tags={"shard.devices": devices[0]}, summary=f"one device: {devices[0]}")
