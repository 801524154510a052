"""Every attention implementation a run can name, in one place.

transformers' own (eager, sdpa, flash_attention_2, flex_attention), ours (the grouped-query decode
attention of ``gqa_decode.py`` beside this file, which the fast engine switches to for decode
steps and ``convert.implementation`` can also name), and a plugin's: ``convert.implementation`` set
to the dotted path of an ``AttentionKind`` in an allowed module (the same allow-list as
``_target_``). Each kind says what it needs, so the convert stage's rules read these fields and
never an implementation's name; kinds that transformers does not ship register themselves with its
``AttentionInterface`` before the model loads.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from pipeline.contract import Problem
from pipeline.registry import built_in_or_allowed
from stages.attention import gqa_decode


@dataclass(frozen=True)
class AttentionKind:
    name: str  # the attn_implementation transformers is given (and reports back after loading)
    what: str  # one line, for messages
    cuda_only: bool = False
    half_precision_on_cuda: bool = False  # refuses float32 on CUDA
    package: str | None = None  # a module it imports at run time
    install: str = ""  # the fix when that package is missing
    register: Callable[[], object] | None = None  # makes ``name`` valid for attn_implementation
    sdpa_kernels: bool = False  # runs PyTorch SDPA kernels, so convert.sdpa_backends can pin one

    def problems(self, device: str, dtype: str) -> list[Problem]:
        """What this machine and load dtype lack for it (before loading)."""
        out = []
        if self.package and importlib.util.find_spec(self.package) is None:
            out.append(Problem("convert.implementation", f"{self.name} needs the {self.package} package, which "
                               "is not installed", self.install or f"pip install {self.package}"))
        if self.cuda_only and not device.startswith("cuda"):
            out.append(Problem("convert.implementation", f"{self.name} runs only on CUDA", "convert=sdpa (on CPU)"))
        if self.half_precision_on_cuda and device.startswith("cuda") and dtype == "float32":
            out.append(Problem("load.dtype", f"{self.name} kernels need float16 or bfloat16 on CUDA; the model "
                               "loads as float32", "load.dtype=bfloat16"))
        return out


BUILT_IN: dict[str, AttentionKind] = {kind.name: kind for kind in (
    AttentionKind("eager", "the model's own Python attention: the reference"),
    AttentionKind("sdpa", "PyTorch scaled_dot_product_attention; PyTorch picks the kernel", sdpa_kernels=True),
    AttentionKind("flash_attention_2", "the flash-attn package's kernels", cuda_only=True,
                  half_precision_on_cuda=True, package="flash_attn",
                  install="pip install flash-attn, or convert=sdpa_flash (PyTorch's own flash kernel)"),
    AttentionKind("flex_attention", "PyTorch flex attention"),
    AttentionKind(gqa_decode.NAME, "SDPA whose decode steps read each key/value head once (grouped-query "
                  "models; ours)", register=gqa_decode.register, sdpa_kernels=True),
)}


def lookup(value: str, allow: list[str]) -> tuple[AttentionKind | None, list[Problem]]:
    """The kind ``convert.implementation`` names, or why it cannot be used."""
    kind, problems = built_in_or_allowed(value, BUILT_IN, allow, "convert.implementation", "attention implementation",
                                         "the path of an AttentionKind like my_pkg.attention.MINE")
    if problems:
        return None, problems
    if not isinstance(kind, AttentionKind):
        return None, [Problem("convert.implementation", f"{value} is not an AttentionKind",
                              "name an instance of stages.attention.AttentionKind")]
    return kind, []
