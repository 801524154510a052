"""generate stage: ``none`` runs no workload (perplexity-only or load-only runs)."""

from __future__ import annotations

from typing import ClassVar

from pipeline.contract import BaseStage, NoSettings, RunContext, StageResult


class NoGenerate(BaseStage):
    name: ClassVar[str] = "generate"
    Config: ClassVar[type] = NoSettings

    def apply(self, ctx: RunContext) -> StageResult:
        return StageResult(summary="skipped (generate=none)")
