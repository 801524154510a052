"""Whether our own Triton kernels launch as programmatic dependents (``generate.fast_pdl``).

inductor launches the compiled decode step's kernels that way when asked (``triton.enable_pdl``); our
kernels inside the same step — the split decode attention and the fused all-reduce + RMSNorm — read
this when they launch, so that they join in: each waits for its predecessor inside (``gdc_wait``,
first thing, before any read) instead of starting only when it has ended, and lets its successor
launch early. Set while a fast decoder that asked for it generates."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

_ON = [False]


@contextmanager
def dependent_launch(on: bool) -> Iterator[None]:
    """While open, ``dependent`` answers ``on`` (for GPUs that can); the earlier answer after."""
    before, _ON[0] = _ON[0], on
    try:
        yield
    finally:
        _ON[0] = before


def options(dependent_launch: bool) -> dict[str, bool]:
    """Triton launch options for it: none unless asked (a launch without them is every earlier one)."""
    return {"launch_pdl": True} if dependent_launch else {}


def capable(device: torch.device) -> bool:
    """Whether kernels on ``device`` can launch as programmatic dependents: a GPU of compute
    capability 9.0 or newer (older ones have no such launch)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def dependent(device: torch.device) -> bool:
    """Whether a kernel launched now on ``device`` launches as a programmatic dependent: asked for,
    and ``capable``."""
    return _ON[0] and capable(device)
