"""Quiet timing: jobs that run side by side on GPUs of their own (``launcher.split_devices``, or
gpu_table's rows) are timed only while no other job of the host loads, compiles or profiles, and no
job starts such work while another is timed (``launcher.quiet_timing``, on by default).

Jobs on different GPUs still share the host: its cores (a compile takes all of them), its memory and
PCIe bandwidth (loading 16 GB of weights). On 4 × H200 the one-GPU 8B job at batch 1 decoded 180.4
tok/s timed beside neighbours that loaded and compiled, and 208.6 tok/s as the same configuration
timed later in the same sweep (BENCHMARKS.md): more than many of the effects we measure.

How: a reader-writer lock for the host, ``fcntl.flock`` on the file the launcher names in ``ENV``,
with a gate in front so that a job waiting to be timed is not starved by jobs that keep starting.
A job holds it shared while it works and exclusively for its timed runs. Only the job's first process
on the host takes it; its other ranks wait at a barrier, so no rank's clock runs before the host is
quiet and no rank waits on a lock while its own group waits on it. Every wait is bounded
(``max_wait_s``): past it the job goes on, and its tag says the host was not quiet. The kernel drops
a lock with its process, so a killed job never blocks another.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from typing import IO, Callable, Iterator

ENV = "OPTIPIPE_QUIET_TIMING"  # the lock file; set by the launcher for jobs that run side by side
FILE_NAME = "quiet-timing.lock"
POLL_S = 0.05
MAX_WAIT_S = 120.0  # the longest a job waits for the host (a neighbour's load and compile take ~100 s)


def wait_limit(collective_timeout_s: float) -> float:
    """How long a job waits for the host: ``MAX_WAIT_S``, or less where its ranks' collectives time
    out sooner (they wait for the job's first process at a barrier meanwhile)."""
    return min(MAX_WAIT_S, collective_timeout_s / 3)


class _HostLock:
    """This process's hold on the host: ``rw`` the reader-writer lock, ``gate`` in front of it."""

    def __init__(self, path: str, max_wait_s: float) -> None:
        self.rw: IO[str] = open(path, "a+")
        self.gate: IO[str] = open(path + ".gate", "a+")
        self.max_wait_s = max_wait_s  # every wait of this job for the host

    @staticmethod
    def _take(f: IO[str], mode: int, deadline: float) -> bool:
        while True:
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(POLL_S)

    def through_gate(self, mode: int) -> bool:
        """``rw`` in ``mode``, asked for behind the gate: while a job waits to be timed, no new work starts."""
        deadline = time.monotonic() + self.max_wait_s
        if not self._take(self.gate, fcntl.LOCK_EX, deadline):
            return False
        try:
            return self._take(self.rw, mode, deadline)
        finally:
            fcntl.flock(self.gate, fcntl.LOCK_UN)

    def busy_again(self) -> bool:
        """Shared again after this job's timed runs, past the gate (waits only for a job being timed):
        a job that waits at the gate for the host may be waiting for this one to end."""
        return self._take(self.rw, fcntl.LOCK_SH, time.monotonic() + self.max_wait_s)

    def release(self) -> None:
        fcntl.flock(self.rw, fcntl.LOCK_UN)


_lock: _HostLock | None = None  # set in the job's first process on this host when the launcher asks


def describe(info: dict[str, float]) -> str:
    """How a job's timed runs met the host, for its tag (``info`` from ``quiet_host``)."""
    if info["quiet"]:
        return f"quiet host (waited {info['waited_s']:.1f} s for neighbours)"
    return f"NOT QUIET: neighbours still busy after {info['waited_s']:.0f} s, timed beside them"


def group_barrier() -> Callable[[], None]:
    """A barrier over the job's ranks (torch.distributed's default group), or nothing for one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.barrier
    return lambda: None


def asked() -> bool:
    return bool(os.environ.get(ENV))


def start_busy(holder: bool, barrier: Callable[[], None] | None = None, max_wait_s: float = MAX_WAIT_S) -> None:
    """At a job's start: its first process on the host (``holder``) holds the host shared, waiting
    while a job is timed or waits to be; the job's other ranks wait for it at the barrier.
    ``max_wait_s`` bounds this wait and the job's later ones (``wait_limit``)."""
    global _lock
    if not asked():
        return
    if holder and _lock is None:
        _lock = _HostLock(os.environ[ENV], max_wait_s)
        _lock.through_gate(fcntl.LOCK_SH)  # bounded: past it the job works beside a timed one
    (barrier or group_barrier())()


@contextmanager
def quiet_host(holder: bool, barrier: Callable[[], None] | None = None) -> Iterator[dict[str, float]]:
    """The block (a job's timed runs) runs while no other job of the host works. Yields
    ``{"waited_s": …, "quiet": 1.0 or 0.0}`` (the holder's view) when quiet timing was asked for, else ``{}``."""
    info: dict[str, float] = {}
    if not asked():
        yield info
        return
    barrier = barrier or group_barrier()
    start = time.monotonic()
    quiet = False
    if holder and _lock is not None:
        _lock.release()
        quiet = _lock.through_gate(fcntl.LOCK_EX)
    barrier()  # no rank starts its clock before the host is quiet
    info.update(waited_s=time.monotonic() - start, quiet=float(quiet))
    try:
        yield info
    except BaseException:
        if holder and _lock is not None:
            _lock.release()  # failing: let the host go, wait for nothing
        raise
    if holder and _lock is not None:
        _lock.busy_again()  # from exclusive: shared at once; after a timeout: waits for a timed job
