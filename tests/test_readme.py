"""Every `optipipe` example in README.md composes and passes validation as written on this CPU
machine — each point of a `-m` sweep too — unless its comment says it needs a GPU (then only GPU
problems may stop it) or it shows a placeholder for the reader's own path or package. Validation is
what `pipeline.dry_run=true` runs: every rule, no weights read."""

from __future__ import annotations

import itertools
import re
import shlex

import pytest
import torch

from pipeline.contract import ConfigProblems
from pipeline.validate import resolve
from tests.conftest import ROOT, composed

PLACEHOLDERS = ("/path/to/", "my_", "<", "…", "...")  # the reader fills these in
NETWORK = "needs the hub"  # a comment that says the example downloads (this machine is offline)
NOT_JOBS = ("bench", "report")  # subcommands with their own arguments (tested in their own files)
GPU_WORDS = ("cuda", "gpu", "flash kernels", "nvidia")


def readme_commands() -> list[tuple[str, list[str], str]]:
    """(line, arguments after `optipipe`, comment) of each `optipipe` line in a bash block."""
    text, out = (ROOT / "README.md").read_text(), []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines as one
            code, _, comment = line.partition("#")
            words = shlex.split(code)
            if "optipipe" not in words:
                continue
            args = words[words.index("optipipe") + 1:]
            flags = args[:1] and args[0].startswith("--")  # --help, --cfg: Hydra's own, not a job
            if args[:1] and args[0] in NOT_JOBS or flags or any(p in code for p in PLACEHOLDERS) or NETWORK in comment:
                continue
            out.append((line.strip(), args, comment.lower()))
    return out


def split_top_level(value: str) -> list[str]:
    """`a,b` → [a, b], but not inside [] or {} (list and dict values)."""
    parts, depth, cur = [], 0, ""
    for ch in value:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def sweep_points(args: list[str]) -> list[list[str]]:
    if "-m" not in args:
        return [args]
    options = [[f"{o.split('=', 1)[0]}={v}" for v in split_top_level(o.split("=", 1)[1])] if "=" in o else [o]
               for o in args if o != "-m"]
    return [list(point) for point in itertools.product(*options)]


COMMANDS = readme_commands()


def test_the_readme_has_examples_to_check():
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("line,args,comment", COMMANDS, ids=[c[0][:60] for c in COMMANDS])
def test_readme_example_validates_on_this_machine(line, args, comment):
    needs_gpu = "gpu" in comment
    for point in sweep_points(args):
        try:
            resolve(composed("tracker=none", *point))
        except ConfigProblems as e:
            text = "; ".join(f"{p.key}: {p.message}" for p in e.problems)
            if needs_gpu and not torch.cuda.is_available() and all(
                    any(w in f"{p.message} {p.fix}".lower() for w in GPU_WORDS) for p in e.problems):
                continue  # the README says it needs a GPU, and a GPU is all it lacks
            pytest.fail(f"README example `{line}` (point {point}) does not validate here: {text}")
