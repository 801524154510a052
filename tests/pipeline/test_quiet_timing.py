"""launcher.quiet_timing: a job's timed runs never overlap a neighbour job's loading or compiling."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

from pipeline import quiet_timing
from tests.conftest import TINY, mlflow_runs, run_cli

FORK = mp.get_context("fork")


def neighbour(lock: str, log, started, hold_s: float, wait_for=None) -> None:
    """Another job's process: busy (loading, compiling) for ``hold_s`` from the moment it may start."""
    os.environ[quiet_timing.ENV] = lock
    if wait_for is not None:
        wait_for.wait(10)
    quiet_timing.start_busy()
    log.put(("busy_from", time.monotonic()))
    started.set()
    time.sleep(hold_s)
    log.put(("busy_to", time.monotonic()))  # the lock goes with the process


def rank(lock: str, log, first: bool, barrier, ready, timing) -> None:
    """A rank of the timed job: busy from its start, then its timed runs under quiet_host."""
    os.environ[quiet_timing.ENV] = lock
    quiet_timing.start_busy()
    ready.wait(10)  # the neighbour is busy by now
    with quiet_timing.quiet_host(first, barrier=lambda: barrier.wait(10)) as info:
        log.put((f"timed_from_{int(first)}", time.monotonic()))
        timing.set()
        time.sleep(0.5)
        log.put((f"timed_to_{int(first)}", time.monotonic()))
    log.put((f"waited_{int(first)}", info["waited_s"]))


def test_timed_runs_wait_for_busy_neighbours_and_neighbours_wait_for_them(tmp_path):
    lock, log = str(tmp_path / quiet_timing.FILE_NAME), FORK.Queue()
    ready, timing, started_late = FORK.Event(), FORK.Event(), FORK.Event()
    barrier = FORK.Barrier(2)
    procs = [FORK.Process(target=neighbour, args=(lock, log, ready, 1.0)),
             *(FORK.Process(target=rank, args=(lock, log, first, barrier, ready, timing)) for first in (True, False)),
             # a job that starts loading while the first is timed: it waits until those runs end
             FORK.Process(target=neighbour, args=(lock, log, started_late, 0.1, timing))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    got: dict[str, list[float]] = {}
    while not log.empty():
        key, value = log.get()
        got.setdefault(key, []).append(value)
    first_busy_to = min(got["busy_to"])
    # both ranks' clocks start only once the busy neighbour is done (rank 1 waits at the barrier)
    assert min(got["timed_from_1"] + got["timed_from_0"]) >= first_busy_to
    assert got["waited_1"][0] > 0.3 and got["waited_0"][0] > 0.3
    # the late neighbour started its work only after the timed runs ended
    assert max(got["busy_from"]) >= min(got["timed_to_0"] + got["timed_to_1"])


def test_without_the_launcher_asking_nothing_waits(monkeypatch):
    monkeypatch.delenv(quiet_timing.ENV, raising=False)
    monkeypatch.setattr(quiet_timing, "_held", None)
    quiet_timing.start_busy()
    with quiet_timing.quiet_host(True) as info:
        assert info == {}


@pytest.mark.parametrize("quiet", [True, False])
def test_a_leased_job_says_how_it_was_timed(tmp_path, quiet):
    """A job that leased its GPU beside others (CPU here: the lease needs only CUDA_VISIBLE_DEVICES)."""
    env = {"OPTIPIPE_GPU_LOCKS": str(tmp_path / "locks"), "CUDA_VISIBLE_DEVICES": "0"}
    run_cli(*TINY, "launcher=torchrun", "shard=data_parallel", "launcher.nproc_per_node=1",
            "launcher.split_devices=true", f"launcher.quiet_timing={str(quiet).lower()}", cwd=tmp_path, env=env, check=0)
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    said = runs[0].data.tags["generate.timed_beside_jobs"]
    assert said.startswith("quiet host (waited ") if quiet else "launcher.quiet_timing=false" in said
