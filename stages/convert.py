"""convert stage: the attention implementation, chosen before load and read back after."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline.contract import BaseStage, LoadPlan, Problem, RunContext, StageError, StageResult

IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class AttentionConfig:
    implementation: str = "sdpa"  # eager | sdpa (the BetterTransformer-era fast path is SDPA now)


class Attention(BaseStage):
    name: ClassVar[str] = "convert"
    Config: ClassVar[type] = AttentionConfig

    def problems(self, root: Any) -> list[Problem]:
        if self.cfg.implementation not in IMPLEMENTATIONS:
            return [Problem("convert.implementation", f"unknown attention implementation "
                            f"{self.cfg.implementation!r}",
                            f"convert.implementation=<one of {', '.join(IMPLEMENTATIONS)}>")]
        return []

    def plan(self, plan: LoadPlan) -> None:
        plan.set(self.name, "attn_implementation", self.cfg.implementation)

    def apply(self, ctx: RunContext) -> StageResult:
        in_effect = getattr(ctx.model.config, "_attn_implementation", None)
        if in_effect != self.cfg.implementation:
            raise StageError(self.name, f"asked for attention {self.cfg.implementation!r} but the "
                             f"loaded model uses {in_effect!r}",
                             "this architecture may not support it; try convert=eager")
        return StageResult(tags={"convert.attn_implementation": in_effect},
                           summary=f"attention {in_effect} (verified on the model)")

    def describe(self) -> str:
        return f"Attention({self.cfg.implementation})"
