"""Cross-stage rules: checks that need more than one section of the config.

Each rule takes the resolved config and returns problems; a rule never loads weights.
"""

from __future__ import annotations

from typing import Any, Callable

from pipeline.contract import Problem

Rule = Callable[[Any], list[Problem]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def check_all(resolved: Any) -> list[Problem]:
    return [p for r in RULES for p in r(resolved)]


@rule
def tracker_reachable(resolved: Any) -> list[Problem]:
    from pipeline.tracking import tracker_problems

    return tracker_problems(resolved.tracker)


@rule
def launcher_known(resolved: Any) -> list[Problem]:
    if resolved.launcher.kind != "local":
        return [Problem("launcher.kind", f"unknown launcher {resolved.launcher.kind!r}",
                        "launcher=local")]
    return []
