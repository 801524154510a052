"""Turns a ``_target_`` string into a stage class, but only from allowed modules.

YAML must never be a way to instantiate an arbitrary dotted path, so a target is accepted only
when its module is a built-in (``stages.``), belongs to a package that declared itself through
the ``optipipe.stages`` entry-point group, or is listed in ``pipeline.allow``.
"""

from __future__ import annotations

import importlib
from typing import Any
from importlib.metadata import entry_points

from pipeline.contract import Problem

ENTRY_POINT_GROUP = "optipipe.stages"
BUILTIN_PREFIXES: tuple[str, ...] = ("stages.",)


class TargetRefused(ValueError):
    pass


def plugin_prefixes() -> list[str]:
    """Module prefixes of installed plugin packages (``name = "package.module:Class"`` or module)."""
    prefixes = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        package = ep.value.split(":")[0].split(".")[0]
        prefixes.append(package + ".")
    return prefixes


def allowed_prefixes(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    return [*BUILTIN_PREFIXES, *plugin_prefixes(), *(p.rstrip(".") + "." for p in extra)]


def resolve_target(target: str, extra_allow: list[str] | tuple[str, ...] = (), what: str = "_target_") -> Any:
    """Import and return what ``target`` names (a class, or e.g. an attention kind) if its module is
    allowed; ``what`` names the setting in messages."""
    prefixes = allowed_prefixes(extra_allow)
    if not any(target.startswith(p) for p in prefixes):
        raise TargetRefused(
            f"{what} {target!r} is outside the allowed modules {prefixes}. Built-in stages live "
            f"under 'stages.'; a third-party stage package declares an entry point in group "
            f"'{ENTRY_POINT_GROUP}', or you allow it explicitly with "
            f"'pipeline.allow=[{target.rsplit('.', 2)[0]}]'")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TargetRefused(f"{what} {target!r}: cannot import module {module_name!r}: {e}") from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise TargetRefused(f"{what} {target!r}: module {module_name!r} has no {attr!r}")
    return cls


def built_in_or_allowed(value: str, built_in: dict[str, Any], allow: list[str], key: str, what: str,
                        example: str) -> tuple[Any, list[Problem]]:
    """What a setting like ``generate.engine`` names: one of ``built_in`` by name, or a dotted path in
    an allowed module (plugins); else the problem, on ``key``."""
    if value in built_in:
        return built_in[value], []
    if "." not in value:
        return None, [Problem(key, f"unknown {what} {value!r}", f"{key}=<one of {', '.join(built_in)}, or {example}>")]
    try:
        return resolve_target(value, allow, what=what), []
    except TargetRefused as e:
        return None, [Problem(key, str(e))]


# What Hydra itself may instantiate from ``hydra.*`` (callbacks, launchers, sweepers, the search's
# sampler) and what logging configs may construct: Hydra and its plugins, our own sweep callback,
# Optuna's samplers and pruners, the standard library's logging.
HYDRA_PREFIXES: tuple[str, ...] = ("hydra.", "hydra_plugins.", "pipeline.", "optuna.samplers.",
                                   "optuna.pruners.", "logging.")
# keys under which a config names something to construct: Hydra's _target_, logging.config's
# "class" (handlers) and "()" (factories)
CONSTRUCTOR_KEYS = ("_target_", "class", "()")


def hydra_target_problems(hydra_node: Any, extra_allow: list[str] | tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(key, target) of every constructor under ``hydra.*`` outside the allowed modules. Hydra builds
    these before any job starts, so they are checked on the composed config before Hydra runs."""
    prefixes = (*HYDRA_PREFIXES, *allowed_prefixes(extra_allow))
    found: list[tuple[str, str]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{path}.{k}"
                if k in CONSTRUCTOR_KEYS and isinstance(v, str) and not v.startswith(prefixes):
                    found.append((key, v))
                walk(v, key)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(hydra_node, "hydra")
    return found
