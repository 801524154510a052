"""``launcher.quiet_timing`` (on by default with ``launcher.split_devices``): sweep jobs still run side
by side on GPUs of their own, but a job's timed runs wait until no neighbour job is loading, compiling
or profiling, and no neighbour starts such work while a job is timed.

Jobs on different GPUs still share the host: its cores (a compile takes all of them), its memory and
PCIe bandwidth (loading 16 GB of weights). On 4 × H200 the one-GPU 8B job at batch 1 decoded 180.4
tok/s timed beside neighbours that loaded and compiled, and 208.6 tok/s as the same configuration
timed later in the same sweep (BENCHMARKS.md): a neighbour can bend a ratio by more than the effect
being measured.

How: one reader-writer lock for the host, ``fcntl.flock`` on the file the launcher names in ``ENV``
(beside the GPU leases). Each process of such a job holds it shared from its start. For its timed
runs the job's ranks let go of theirs and its first rank takes it exclusively; the ranks meet at a
barrier before and after that, so no rank's clock runs while its first rank still waits. The kernel
drops a lock with its process, so a killed job never blocks another.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from typing import IO, Callable, Iterator

ENV = "OPTIPIPE_QUIET_TIMING"  # the lock file; set by the launcher for a job that leased its GPUs
FILE_NAME = "quiet-timing.lock"

_held: IO[str] | None = None  # this process's open lock file, held shared while it works


def start_busy() -> None:
    """Hold the host's lock shared for the rest of this process (a job's rank at its start); waits
    while another job is timed. Nothing when the launcher asked for no quiet timing."""
    global _held
    path = os.environ.get(ENV)
    if not path or _held is not None:
        return
    f = open(path, "a+")
    fcntl.flock(f, fcntl.LOCK_SH)
    _held = f


def group_barrier() -> Callable[[], None]:
    """A barrier over the job's ranks (torch.distributed's default group), or nothing for one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.barrier
    return lambda: None


@contextmanager
def quiet_host(first_rank: bool, barrier: Callable[[], None] | None = None) -> Iterator[dict[str, float]]:
    """The block (a job's timed runs) runs while no other job of the host loads or compiles. Yields a
    dict that holds ``waited_s`` (how long the job waited for quiet) when quiet timing is on, else empty."""
    info: dict[str, float] = {}
    if _held is None:
        yield info
        return
    barrier = barrier or group_barrier()
    fcntl.flock(_held, fcntl.LOCK_UN)
    barrier()  # every rank of this job has let go before its first rank asks for the host alone
    start = time.monotonic()
    if first_rank:
        fcntl.flock(_held, fcntl.LOCK_EX)
    barrier()  # ...and no rank starts its clock before the host is quiet
    info["waited_s"] = time.monotonic() - start
    try:
        yield info
    except BaseException:
        if first_rank:
            fcntl.flock(_held, fcntl.LOCK_UN)
        raise  # not busy again: a failing rank must not wait for a neighbour before its group hears of it
    fcntl.flock(_held, fcntl.LOCK_SH)  # busy again (profile, evaluate); the first rank's lock turns shared
