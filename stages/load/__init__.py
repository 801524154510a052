"""load stage: one materialization of the model from any source, with every stage's kwargs."""

from stages.load.stage import Load, LoadConfig

__all__ = ["Load", "LoadConfig"]
