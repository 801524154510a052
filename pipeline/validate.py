"""Validation before any weight is read: build every stage, check every rule, report all at once."""

from __future__ import annotations

import difflib
from typing import Any

from omegaconf import DictConfig

from pipeline import rules
from pipeline.config import SECTIONS, typed
from pipeline.contract import STAGE_ORDER, BaseStage, ConfigProblems, Loader, Problem, Stage, missing_methods
from pipeline.registry import TargetRefused, resolve_target
from pipeline.resolved import Resolved


def build_stage(name: str, node: Any, allow: list[str]) -> tuple[BaseStage | None, list[Problem]]:
    """Resolve ``node._target_`` through the allow-list, type-check its keys, construct it."""
    if node is None or "_target_" not in node:
        return None, [Problem(name, f"stage {name!r} has no _target_",
                              f"pick an option of the group, e.g. {name}=<option>")]
    try:
        cls = resolve_target(str(node["_target_"]), allow)
    except TargetRefused as e:
        return None, [Problem(f"{name}._target_", str(e))]
    missing = missing_methods(cls, Loader if name == "load" else Stage) + ([] if hasattr(cls, "Config") else ["Config"])
    if missing:
        return None, [Problem(f"{name}._target_", f"{cls.__module__}.{cls.__qualname__} is not a "
                              f"{'load stage' if name == 'load' else 'stage'}: it lacks {', '.join(missing)}",
                              "subclass pipeline.contract.BaseStage (defaults for problems, plan, apply, describe) "
                              "and give it a Config dataclass" + ("; see pipeline.contract.Loader" if name == "load" else ""))]
    stage_cfg, problems = typed(cls.Config, node, name)
    if problems:
        return None, problems
    stage = cls(stage_cfg)
    if not getattr(stage, "name", None):
        stage.name = name
    return stage, []


def unknown_sections(cfg: DictConfig) -> list[Problem]:
    """Top-level keys that no part of the pipeline reads (``+pipline.dry_run=true``): refused, not
    silently ignored, with the closest known section."""
    known = [*SECTIONS, *STAGE_ORDER]
    out = []
    for key in cfg.keys():
        if key in known or key == "hydra":
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        out.append(Problem(str(key), "unknown top-level section: nothing reads it",
                           f"did you mean {close[0]}.…?" if close else
                           f"remove it; the sections are {', '.join(known)}"))
    return out


def build(cfg: DictConfig) -> Resolved:
    """Typed sections and built stages, the rules not checked: for a configuration that was already
    validated (a torchrun rank's, handed over by its parent). ``ConfigProblems`` if it does not type."""
    problems: list[Problem] = unknown_sections(cfg)
    sections: dict[str, Any] = {}
    for key, schema in SECTIONS.items():
        value, found = typed(schema, cfg.get(key), key)
        problems += found
        sections[key] = value
    allow = list(sections["pipeline"].allow) if sections["pipeline"] else []
    stages: dict[str, BaseStage] = {}
    for name in STAGE_ORDER:
        stage, found = build_stage(name, cfg.get(name), allow)
        problems += found
        if stage is not None:
            stages[name] = stage
    if problems:
        raise ConfigProblems(problems)
    return Resolved(cfg=cfg, stages=stages, **sections)


def resolve(cfg: DictConfig) -> Resolved:
    """Everything the run needs, or ``ConfigProblems`` listing every problem found."""
    resolved = build(cfg)  # the rules below need typed sections and every stage
    problems: list[Problem] = []
    for stage in resolved.stages.values():
        problems += stage.problems(resolved)
    problems += rules.check_all(resolved)
    resolved.warnings = [p for p in problems if p.severity == "warning"]
    errors = [p for p in problems if p.severity != "warning"]
    if errors:
        raise ConfigProblems(errors + resolved.warnings)
    return resolved
