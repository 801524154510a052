"""Checks of the command line made before Hydra runs: constructors outside the allowed modules,
and mistyped keys (answered with the closest real key instead of Hydra's "+key" advice).

Hydra builds ``hydra.callbacks``, the launcher, the sweeper and the logging handlers before any of
our code sees the job, so a YAML file (an experiment, a ``--config-dir``) could otherwise run any
callable, even with ``pipeline.dry_run=true``. This composes the command line's config once, as
Hydra will, and checks every constructor under ``hydra.*`` first.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.contract import Problem
from pipeline.registry import HYDRA_PREFIXES, hydra_target_problems


def sweep_axes(overrides: list[str]) -> list[tuple[str, list[str] | None]]:
    """(key, its jobs' overrides) for each command-line override, parsed as Hydra parses them: one
    override for a plain value, one per value of a comma list or range()/choice(); None for a
    search's interval (the sweeper picks those values as it goes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes: list[tuple[str, list[str] | None]] = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override():
            axes.append((o.key_or_group, [o.input_line]))
        elif o.is_interval_sweep():
            axes.append((o.key_or_group, None))
        else:
            axes.append((o.key_or_group, [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]))
    return axes


def _one_point(overrides: list[str]) -> list[str]:
    """The overrides of a sweep's first job (a search's intervals left out): what to compose."""
    return [values[0] for _, values in sweep_axes(overrides) if values]


def _compose(args, overrides: list[str]):
    from hydra import compose, initialize_config_module

    if args.config_dir:
        overrides = [*overrides, f"hydra.searchpath=[file://{os.path.abspath(args.config_dir)}]"]
    with initialize_config_module(version_base="1.3", config_module="conf"):
        return compose(config_name=args.config_name or "config", overrides=overrides, return_hydra_config=True)


MAX_TYPOS = 10  # mistyped keys reported in one go (each costs one more composition)


def _misplaced(error: Exception) -> str | None:
    """The key of an override that Hydra refused because no such key exists, if that was the error."""
    text = f"{error}\n{error.__cause__ or ''}"
    found = re.search(r"Could not override '([^']+)'", text)
    return found.group(1) if found and "is not in struct" in text else None


def _closest(full: str, root) -> Problem:
    """``generate.batchsize`` → the key named and the closest key of its section (or section)."""
    from omegaconf import OmegaConf

    parent, _, leaf = full.rpartition(".")
    node = OmegaConf.select(root, parent) if parent else root
    if node is None:  # the section itself is misspelt (generat.batch_size): match it among the sections
        parent, leaf, node = "", full.split(".", 1)[0], root
    known = sorted(str(k) for k in node.keys() if k != "hydra") if hasattr(node, "keys") else []
    close = difflib.get_close_matches(leaf, known, n=1)
    where = f"{parent}." if parent else ""
    fix = (f"{where}{close[0]}… (did you mean {close[0]!r}?)" if close else
           f"remove it; {parent or 'the config'} has {', '.join(known)}" if known else f"remove {full}")
    return Problem(full, "unknown key", fix + f"; a new key of a plugin stage is added with +{full}=…")


def problems_before_hydra(argv: list[str]) -> list[Problem]:
    """Problems for mistyped keys (all of them), else for every ``hydra.*`` constructor outside the
    allowed modules (none when the command line fails to compose for another reason: Hydra then
    reports that itself)."""
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args, _ = get_args_parser().parse_known_args(argv)
    typos: list[str] = []
    try:
        overrides = _one_point(list(args.overrides or []))
    except (HydraException, OmegaConfBaseException, ValueError):
        return []
    for _ in range(MAX_TYPOS + 1):
        rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in typos]
        try:
            cfg = _compose(args, rest)
            break
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            key = _misplaced(e)
            if key is None or key in typos:
                return []  # another kind of error: Hydra's own message says it
            typos.append(key)
    else:
        return []
    if typos:
        return [_closest(key, cfg) for key in typos]
    node = OmegaConf.to_container(cfg.hydra, resolve=False)
    allow = list(cfg.get("pipeline", {}).get("allow") or [])
    return [Problem(key, f"Hydra would construct {target!r}, outside the allowed modules "
                    f"({', '.join(HYDRA_PREFIXES)}, stages and plugins)",
                    f"remove it, or allow its package: pipeline.allow=[{target.split('.')[0]}]")
            for key, target in hydra_target_problems(node, allow)] + folders_outside_outputs(cfg)


def folders_outside_outputs(cfg) -> list[Problem]:
    """Run and sweep folders stay under ./outputs unless ``pipeline.allow_outside_outputs=true``:
    a config file (or a mistyped override) cannot make a run write its files anywhere else."""
    if cfg.get("pipeline", {}).get("allow_outside_outputs") is True:
        return []
    outputs = (Path.cwd() / "outputs").resolve()
    out = []
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        section, leaf = key.rsplit(".", 1)
        raw = str(OmegaConf.to_container(OmegaConf.select(cfg, section), resolve=False).get(leaf) or "")
        # the part before the first ${…} is fixed; what an interpolation adds stays below it
        folder = (Path.cwd() / raw.split("${", 1)[0]).resolve()
        if raw and outputs != folder and outputs not in folder.parents:
            out.append(Problem(key, f"{raw!r} is outside {outputs}", "a folder under outputs/, or "
                               "pipeline.allow_outside_outputs=true to write there on purpose"))
    return out
