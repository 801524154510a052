"""Every rank of a tensor-parallel group picks the same kernel configurations.

With coordinate-descent tuning each process benchmarks its own kernels and keeps the configuration
it measured fastest. Timing noise makes ranks choose differently for the same kernel (H200 TP2
profile: the down projection took 22.3 µs on rank 0 and 43.3 µs on rank 1), and since every layer
ends in an all-reduce, the faster rank waits for the slower one at each of them: the step runs at the
speed of the worst choice of every kernel. So while tuning is agreed, each benchmark's time becomes
the slowest rank's time for that configuration (an all-reduce MAX over a CPU group): all ranks make
the same decisions from the same numbers and keep what is fastest on the slowest rank.

The tensor-parallel stage installs the agreement (``install``: a CPU group and a hook on one method
of inductor's runtime autotuner, ``CachingAutotuner.bench``, a private API); it applies only inside
calls wrapped by ``scoped`` (the fast engine's decode step), so other compiled code tunes as before.
Where the hook point is missing, tuning stays per rank and ``status`` says so (the run's tag). The
kernel and configuration travel with every time, so ranks that benchmark different kernels fail with
a clear error instead of pairing unrelated times. Inductor's caches are off for agreed steps (see
``COMPILE_OPTIONS``): a rank that found its choice in a cache would skip benchmarks its peers wait in.
"""

from __future__ import annotations

import zlib
from datetime import timedelta
from typing import Any, Callable

AGREED = "agreed_over_ranks"
# inductor options for a step compiled while tuning is agreed: every rank compiles and tunes from
# scratch, so every rank benchmarks the same kernels in the same order
COMPILE_OPTIONS = {"fx_graph_cache": False, "autotune_local_cache": False, "autotune_remote_cache": False}

_state: dict[str, Any] = {"group": None, "original": None, "status": "per_rank", "in_scope": False}


class RankDisagreement(RuntimeError):
    """Ranks benchmarked different kernels at the same point (their graphs differ)."""


def status() -> str:
    """``agreed_over_ranks`` while installed, else ``per_rank`` or why not agreed."""
    return _state["status"]


def active() -> bool:
    return _state["group"] is not None


def _fingerprint(kernel: str, config: str) -> float:
    """The kernel and configuration as a number a float64 all-reduce carries exactly."""
    return float(zlib.crc32(f"{kernel}|{config}".encode()) & 0xFFFFFF)


def agreed_time(group: Any, seconds: float, kernel: str, config: str) -> float:
    """The slowest rank's time for this kernel and configuration; every rank must call it with the
    same kernel and configuration, in the same order."""
    import torch
    import torch.distributed as dist

    mark = _fingerprint(kernel, config)
    both = torch.tensor([seconds, mark, -mark], dtype=torch.float64)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if both[1].item() != -both[2].item():
        raise RankDisagreement(f"ranks benchmarked different kernels while agreeing on tuning (this rank: "
                               f"{kernel} {config}); generate.fast_coordinate_descent=false avoids the tuning")
    return float(both[0].item())


def _agreeing(original: Callable) -> Callable:
    def bench(self: Any, launcher: Any, *args: Any, **kwargs: Any) -> float:
        own = original(self, launcher, *args, **kwargs)
        group = _state["group"]
        if group is None or not _state["in_scope"]:
            return own
        kernel = str((getattr(self, "inductor_meta", None) or {}).get("kernel_name", "?"))
        return agreed_time(group, own, kernel, str(getattr(launcher, "config", "?")))

    bench.__wrapped__ = original  # type: ignore[attr-defined]
    return bench


def install(timeout_s: float = 600.0, groups: list[list[int]] | None = None) -> str:
    """Agree on tuning from now on in this process (a collective: every rank of the default group
    calls it), with every rank, or (``groups``) with the ranks of this rank's group only — replicas
    that may compile other shapes than their neighbours'. Returns the status: ``agreed_over_ranks``,
    or why tuning stays per rank."""
    import torch.distributed as dist

    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError as e:  # an inductor without its runtime autotuner
        _state["status"] = f"per_rank (no inductor autotuner: {e})"
        return status()
    if not callable(getattr(CachingAutotuner, "bench", None)):
        _state["status"] = "per_rank (this inductor's autotuner has no bench method)"
        return status()
    # a CPU group of its own: the times are host numbers, and NCCL's stream order is left alone
    timeout = timedelta(seconds=timeout_s)
    group = (dist.new_subgroups_by_enumeration(groups, timeout=timeout, backend="gloo")[0] if groups
             else dist.new_group(backend="gloo", timeout=timeout))
    if _state["original"] is None:
        _state["original"] = CachingAutotuner.bench
        CachingAutotuner.bench = _agreeing(CachingAutotuner.bench)
    _state.update(group=group, status=AGREED)
    return status()


def scoped(fn: Callable) -> Callable:
    """``fn`` with agreed tuning for whatever inductor tunes while it runs (``fn`` itself when the
    agreement is not installed)."""
    if not active():
        return fn

    def agreeing(*args: Any, **kwargs: Any) -> Any:
        _state["in_scope"] = True
        try:
            return fn(*args, **kwargs)
        finally:
            _state["in_scope"] = False

    return agreeing


def uninstall() -> None:
    """Back to per-rank tuning (the original method restored)."""
    if _state["original"] is not None:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner

        CachingAutotuner.bench = _state["original"]
    _state.update(group=None, original=None, status="per_rank", in_scope=False)
