"""launcher.split_devices: sweep jobs that run side by side (``hydra/launcher=joblib``) each take a
group of GPUs no other job of this user on this host holds, and wait while none is free.

A job's position in the sweep cannot pick its GPUs: a sweep over ``launcher.nproc_per_node=1,2,4``
mixes group sizes, and job k's "k-th group" of one size overlaps another job's group of another
size, so two timed jobs would share a GPU. Here a job locks one file per GPU (``fcntl.flock``,
released by the kernel when the job's process ends, however it ends: no stale leases). Jobs are
served in turn (a queue lock), and groups are aligned (``nproc_per_node`` consecutive GPUs from a
multiple of it), so a 4-GPU job is neither overtaken by later 1-GPU jobs nor kept out by 1-GPU jobs
scattered over every pair.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

POLL_S = 2.0


def lock_folder() -> Path:
    """One folder per user on this host (``OPTIPIPE_GPU_LOCKS`` overrides; tests use it)."""
    given = os.environ.get("OPTIPIPE_GPU_LOCKS")
    return Path(given) if given else Path(tempfile.gettempdir()) / f"optipipe-gpu-locks-{os.getuid()}"


def aligned_groups(ids: list[str], size: int) -> list[list[str]]:
    """``size`` consecutive GPUs from each multiple of ``size``; a size beyond the GPUs: all of them."""
    if size >= len(ids):
        return [ids]
    return [ids[start:start + size] for start in range(0, len(ids) - size + 1, size)]


def _lock_file(folder: Path, gpu: str) -> Path:
    return folder / f"gpu-{gpu}.lock"


def _try_group(folder: Path, group: list[str], holder: str) -> list[IO[str]] | None:
    """Locks on every GPU of the group, or None (nothing held) if another job holds one. A lock file
    then names its holder, for the message of a job that waits."""
    held: list[IO[str]] = []
    for gpu in group:
        f = open(_lock_file(folder, gpu), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            for h in held:
                h.close()  # closing the file releases its lock
            return None
        held.append(f)
    for f in held:
        f.truncate(0)
        f.write(f"pid {os.getpid()}{': ' + holder if holder else ''}\n")
        f.flush()
    return held


def holders(folder: Path, ids: list[str]) -> str:
    """Who holds the GPUs that are taken now, as their lock files say (``GPU 0: pid 123: <job>``)."""
    taken = []
    for gpu in ids:
        path = _lock_file(folder, gpu)
        if not path.exists():
            continue
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                continue  # free: what it says is a past holder's
            except BlockingIOError:
                f.seek(0)
                taken.append(f"GPU {gpu}: {f.read().strip() or 'a job'}")
    return "; ".join(taken)


@contextmanager
def gpu_lease(ids: list[str], size: int, say: Callable[[str], None] = print,
              poll_s: float = POLL_S, holder: str = "") -> Iterator[list[str]]:
    """The first free aligned group of ``size`` GPUs among ``ids`` (CUDA_VISIBLE_DEVICES entries),
    held until the block ends; waits (and says so once, naming the holders) while every group has a
    GPU in use. ``holder``: what the lock files say besides this process's pid (e.g. the job's folder)."""
    folder = lock_folder()
    folder.mkdir(parents=True, exist_ok=True)
    held = _take_in_turn(folder, aligned_groups(ids, size), size, ids, say, poll_s, holder)
    try:
        yield held[0]
    finally:
        for f in held[1]:
            f.close()


def _take_in_turn(folder: Path, groups: list[list[str]], size: int, ids: list[str], say: Callable[[str], None],
                  poll_s: float, holder: str) -> tuple[list[str], list[IO[str]]]:
    """Jobs take GPUs one at a time, in the order they asked: the job at the head of the queue holds
    the queue's lock until its group is free, so GPUs that free up meanwhile are not taken by a later,
    smaller job (without a queue a 4-GPU job waits while 1-GPU jobs take every GPU that frees up)."""
    with open(folder / "queue.lock", "a") as queue:
        fcntl.flock(queue, fcntl.LOCK_EX)  # blocks behind earlier jobs; a signal still interrupts it
        waited = False
        while True:
            for group in groups:
                files = _try_group(folder, group, holder)
                if files is not None:
                    return group, files  # closing the queue file lets the next job in
            if not waited:
                who = holders(folder, ids)
                say(f"optipipe: waiting for {size} free GPU(s) of {','.join(ids)} "
                    f"({'held by ' + who if who else 'freed just now: trying again'})")
                waited = True
            time.sleep(poll_s)
