"""evaluate stage: perplexity, agreement with the unoptimized reference, quality gate."""

from stages.evaluate.none import NoEvaluate
from stages.evaluate.stage import Evaluate, EvaluateConfig

__all__ = ["Evaluate", "EvaluateConfig", "NoEvaluate"]
