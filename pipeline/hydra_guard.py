"""Refuses a config that would make Hydra construct something outside the allowed modules.

Hydra builds ``hydra.callbacks``, the launcher, the sweeper and the logging handlers before any of
our code sees the job, so a YAML file (an experiment, a ``--config-dir``) could otherwise run any
callable, even with ``pipeline.dry_run=true``. This composes the command line's config once, as
Hydra will, and checks every constructor under ``hydra.*`` first.
"""

from __future__ import annotations

import os

from pipeline.contract import Problem
from pipeline.registry import HYDRA_PREFIXES, hydra_target_problems


def _one_point(overrides: list[str]) -> list[str]:
    """The overrides of a sweep's first job (a search's intervals left out): what to compose."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override():
            out.append(o.input_line)
        elif not o.is_interval_sweep():
            out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
    return out


def foreign_targets(argv: list[str]) -> list[Problem]:
    """Problems for every ``hydra.*`` constructor outside the allowed modules (none when the command
    line does not compose: Hydra then reports that itself)."""
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args, _ = get_args_parser().parse_known_args(argv)
    try:
        overrides = _one_point(list(args.overrides or []))
        if args.config_dir:
            overrides.append(f"hydra.searchpath=[file://{os.path.abspath(args.config_dir)}]")
        with initialize_config_module(version_base="1.3", config_module="conf"):
            cfg = compose(config_name=args.config_name or "config", overrides=overrides, return_hydra_config=True)
        node = OmegaConf.to_container(cfg.hydra, resolve=False)
        allow = list(cfg.get("pipeline", {}).get("allow") or [])
    except (HydraException, OmegaConfBaseException, ValueError):
        return []
    return [Problem(key, f"Hydra would construct {target!r}, outside the allowed modules "
                    f"({', '.join(HYDRA_PREFIXES)}, stages and plugins)",
                    f"remove it, or allow its package: pipeline.allow=[{target.split('.')[0]}]")
            for key, target in hydra_target_problems(node, allow)]
