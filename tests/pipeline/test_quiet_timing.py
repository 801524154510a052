"""Quiet timing: a job's timed runs never overlap a neighbour job's loading or compiling, a job waiting
to be timed is not starved by jobs that keep starting, and every wait is bounded."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest

from pipeline import quiet_timing
from tests.conftest import TINY, mlflow_runs, run_cli

FORK = mp.get_context("fork")


def neighbour(lock: str, log, name: str, hold_s: float, after=None, started=None) -> None:
    """Another one-process job: busy (loading, compiling) for ``hold_s`` once it may start."""
    os.environ[quiet_timing.ENV] = lock
    if after is not None:
        after.wait(10)
        time.sleep(0.2)
    quiet_timing.start_busy(holder=True)
    log.put((f"{name}_from", time.monotonic()))
    if started is not None:
        started.set()
    time.sleep(hold_s)
    log.put((f"{name}_to", time.monotonic()))  # the lock goes with the process


def rank(lock: str, log, holder: bool, barrier, after, waiting, timing, max_wait_s: float) -> None:
    """A rank of a two-process job: the holder takes the host's lock, the other waits at the barrier."""
    os.environ[quiet_timing.ENV] = lock
    after.wait(10)  # the first neighbour is busy by now
    quiet_timing.start_busy(holder, barrier=lambda: barrier.wait(10), max_wait_s=max_wait_s)
    waiting.set()
    with quiet_timing.quiet_host(holder, barrier=lambda: barrier.wait(10)) as info:
        log.put((f"timed_from_{int(holder)}", time.monotonic()))
        timing.set()
        time.sleep(0.5)
        log.put((f"timed_to_{int(holder)}", time.monotonic()))
    log.put((f"info_{int(holder)}", info))


def run_scene(tmp_path, busy_s: float, max_wait_s: float) -> dict[str, list]:
    """A busy neighbour A; a two-rank job J that wants to be timed; a job B that arrives while J waits;
    a job C that arrives while J is timed."""
    lock, log = str(tmp_path / quiet_timing.FILE_NAME), FORK.Queue()
    a_started, j_waiting, j_timing = FORK.Event(), FORK.Event(), FORK.Event()
    barrier = FORK.Barrier(2)
    procs = [FORK.Process(target=neighbour, args=(lock, log, "a", busy_s), kwargs={"started": a_started}),
             *(FORK.Process(target=rank, args=(lock, log, holder, barrier, a_started, j_waiting, j_timing, max_wait_s))
               for holder in (True, False)),
             FORK.Process(target=neighbour, args=(lock, log, "b", 0.1), kwargs={"after": j_waiting}),
             FORK.Process(target=neighbour, args=(lock, log, "c", 0.1), kwargs={"after": j_timing})]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    got: dict[str, list] = {}
    while not log.empty():
        key, value = log.get()
        got.setdefault(key, []).append(value)
    return got


def test_timed_runs_wait_for_busy_neighbours_and_no_new_work_starts_meanwhile(tmp_path):
    got = run_scene(tmp_path, busy_s=1.5, max_wait_s=20)
    timed_from = min(got["timed_from_1"] + got["timed_from_0"])
    timed_to = min(got["timed_to_1"] + got["timed_to_0"])
    assert timed_from >= got["a_to"][0]  # both ranks' clocks start once the busy neighbour is done
    assert got["info_1"][0]["quiet"] == 1.0 and got["info_1"][0]["waited_s"] > 0.5
    assert got["b_from"][0] >= timed_to  # arrived while J waited: not let in ahead of J (no starving)
    assert got["c_from"][0] >= timed_to  # arrived while J was timed: waited for it


def test_a_wait_for_the_host_is_bounded(tmp_path):
    got = run_scene(tmp_path, busy_s=4.0, max_wait_s=0.5)
    info = got["info_1"][0]
    assert info["quiet"] == 0.0 and 0.4 < info["waited_s"] < 3.0  # gave up: timed beside a busy neighbour
    assert min(got["timed_from_1"] + got["timed_from_0"]) < got["a_to"][0]


def test_without_the_launcher_asking_nothing_waits(monkeypatch):
    monkeypatch.delenv(quiet_timing.ENV, raising=False)
    quiet_timing.start_busy(holder=True)
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
