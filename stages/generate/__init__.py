"""generate stage: timed text generation with warm-up, repeats and saved samples."""

from stages.generate.none import NoGenerate
from stages.generate.stage import Generate, GenerateConfig

__all__ = ["Generate", "GenerateConfig", "NoGenerate"]
