"""Agreed kernel tuning over 2 real gloo processes: inside the decode step every rank gets the
slowest rank's time for each configuration it benchmarks (so all make the same choice), outside it
each keeps its own; ranks benchmarking different kernels fail loudly on both sides."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import torch.distributed as dist
import torch.multiprocessing as mp
from torch._inductor.runtime.triton_heuristics import CachingAutotuner

from stages.generate.engine import step_compile_options
from stages.shard import agreed_tuning


def _worker(rank: int, world: int, store: str, errors) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        _checks(rank) if world == 2 else _replica_checks(rank)
    except BaseException as e:  # reported to the parent, which fails the test with it
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        agreed_tuning.uninstall()
        if dist.is_initialized():
            dist.destroy_process_group()


def _checks(rank: int) -> None:
    # each rank "measures" a different time for the same configuration, as noise makes them do
    CachingAutotuner.bench = lambda self, launcher, *a, **k: launcher.config["ms"][rank]
    tuner = SimpleNamespace(inductor_meta={"kernel_name": "triton_red_fused_mm_0"})
    launcher = SimpleNamespace(config={"XBLOCK": 1, "ms": (1.0, 3.0)})
    assert "coordinate_descent_tuning" in step_compile_options("default", True)
    assert "autotune_local_cache" not in step_compile_options("default", True)  # not installed: caches stay on

    assert agreed_tuning.install(60) == agreed_tuning.AGREED and agreed_tuning.active()
    # steps compiled from now on tune from scratch on every rank (no cache hit skips a benchmark)
    assert step_compile_options("default", True)["autotune_local_cache"] is False
    assert "autotune_local_cache" not in step_compile_options("default", False)
    bench = CachingAutotuner.bench
    assert bench(tuner, launcher) == (1.0, 3.0)[rank]  # outside the decode step: per rank
    in_step = agreed_tuning.scoped(lambda: bench(tuner, launcher))
    assert in_step() == 3.0  # the slowest rank's time, on both ranks
    assert bench(tuner, launcher) == (1.0, 3.0)[rank]  # the scope ends with the call

    other = SimpleNamespace(inductor_meta={"kernel_name": f"triton_poi_fused_{rank}"})
    try:
        agreed_tuning.scoped(lambda: bench(other, launcher))()
        raise AssertionError("different kernels on the ranks must fail, not pair their times")
    except agreed_tuning.RankDisagreement as e:
        assert "generate.fast_coordinate_descent=false" in str(e)


def _replica_checks(rank: int) -> None:
    """4 ranks as 2 replicas: each replica agrees within itself, on kernels its neighbour never tunes."""
    CachingAutotuner.bench = lambda self, launcher, *a, **k: launcher.config["ms"][rank]
    replica = rank // 2
    tuner = SimpleNamespace(inductor_meta={"kernel_name": f"triton_red_fused_mm_replica{replica}"})
    launcher = SimpleNamespace(config={"XBLOCK": 1, "ms": (1.0, 3.0, 5.0, 4.0)})
    assert agreed_tuning.install(60, [[0, 1], [2, 3]]) == agreed_tuning.AGREED
    assert agreed_tuning.scoped(lambda: CachingAutotuner.bench(tuner, launcher))() == (3.0, 5.0)[replica]


def test_replicas_agree_within_themselves():
    errors = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(4, f"{folder}/store", errors), nprocs=4, start_method="spawn")
    assert errors.empty(), errors.get()


def test_ranks_agree_on_each_benchmark_only_inside_the_decode_step():
    errors = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:  # the file store removes its file when the ranks are done
        mp.start_processes(_worker, args=(2, f"{folder}/store", errors), nprocs=2, start_method="spawn")
    assert errors.empty(), errors.get()


def test_without_the_agreement_the_step_is_the_compiled_function_itself():
    agreed_tuning.uninstall()
    step = object()
    assert agreed_tuning.scoped(step) is step and agreed_tuning.status() == "per_rank"
