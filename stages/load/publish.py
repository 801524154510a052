"""Cache folders that appear whole or not at all, built once however many processes ask at once."""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from pathlib import Path

from pipeline.contract import StageError


def ready(dest: Path) -> bool:
    return (dest / "config.json").is_file()


def publish(build, dest: Path) -> Path:
    """Build into a temp dir beside ``dest`` and rename: no process ever sees half a cache. One
    process builds while the others asking for it (a torchrun job's ranks, a sweep's jobs on one
    cache) wait on a lock file beside it and then read what it built: building an 8B model's random
    weights on every rank at once took each rank a GPU's worth of memory and minutes. A builder that
    dies releases the lock (the kernel drops it), and the next one in line builds."""
    if ready(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"optipipe: waiting for another process building {dest}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if ready(dest):  # built while this process waited
            return dest
        if dest.exists():  # not ours: a publish renames whole folders only
            raise StageError("load", f"{dest} exists but holds no config.json (not a finished cache folder)",
                             f"delete it (rm -r {dest}) and run again; it is built anew")
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        try:
            build(tmp)
            tmp.rename(dest)  # dest cannot exist here: only a lock holder builds
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
