"""evaluate stage: quality next to speed. ``none`` scores nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.contract import BaseStage, RunContext, StageResult


@dataclass
class NoEvaluateConfig:
    pass


class NoEvaluate(BaseStage):
    name: ClassVar[str] = "evaluate"
    Config: ClassVar[type] = NoEvaluateConfig

    def apply(self, ctx: RunContext) -> StageResult:
        return StageResult(summary="skipped (evaluate=none)")
