"""quantize stage: weight quantization chosen in YAML, verified on the loaded model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pipeline.contract import BaseStage, RunContext, StageResult


def count_linear(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


@dataclass
class NoQuantizeConfig:
    pass


class NoQuantize(BaseStage):
    """Weights stay in the load dtype; reports what a quantizer would have had to work with."""

    name: ClassVar[str] = "quantize"
    Config: ClassVar[type] = NoQuantizeConfig

    def apply(self, ctx: RunContext) -> StageResult:
        n = count_linear(ctx.model)
        return StageResult(metrics={"linear_layers": float(n), "quantized_layers": 0.0},
                           tags={"quantize.method": "none"}, summary=f"none ({n} Linear layers)")
