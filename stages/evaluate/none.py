"""evaluate stage: quality next to speed. ``none`` scores nothing."""

from __future__ import annotations

from typing import ClassVar

from pipeline.contract import BaseStage, NoSettings, RunContext, StageResult


class NoEvaluate(BaseStage):
    name: ClassVar[str] = "evaluate"
    Config: ClassVar[type] = NoSettings

    def apply(self, ctx: RunContext) -> StageResult:
        return StageResult(summary="skipped (evaluate=none)")
