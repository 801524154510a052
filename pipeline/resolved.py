"""What validation hands the runner: the config as typed settings and constructed (not yet loaded)
stages. Its own module so that the runner, the console and the rules read it without importing
validation (no import circle)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from pipeline.config import LauncherSettings, ModelSpec, PipelineSettings, TrackerSettings
from pipeline.contract import BaseStage, Problem


@dataclass
class Resolved:
    """The config turned into typed settings and constructed (not yet loaded) stages."""

    cfg: DictConfig
    model: ModelSpec
    pipeline: PipelineSettings
    tracker: TrackerSettings
    launcher: LauncherSettings
    stages: dict[str, BaseStage] = field(default_factory=dict)
    warnings: list[Problem] = field(default_factory=list)
