"""Runs whose process died without closing them are marked KILLED, not left RUNNING for ever.

SIGKILL, the kernel's out-of-memory killer or a crash of the interpreter end a process before it
can end its MLflow run, and such a run would count as running in every dashboard and report. Each
run (and sweep parent) records its host and process id; a run still RUNNING whose process on this
host is gone is marked KILLED, with a tag saying why, by the next run on that store and by
``optipipe report --repair``. Runs started on other hosts are left alone: their processes cannot
be checked from here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

HOST_TAG = "host"
PID_TAG = "optipipe.pid"
WHY_TAG = "optipipe.killed_why"


def owner_tags() -> dict[str, str]:
    """What a new run records so that a later process can tell whether it is still alive."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs an optipipe process (a pid reused by another program counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, and not ours to judge
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        command = cmdline.read_bytes()
        return b"pipeline" in command or b"optipipe" in command
    except OSError:  # no /proc (not Linux), or it ended just now
        return cmdline.parent.exists()


def repair(client: Any, experiment_ids: list[str] | None = None, found_by: str = "") -> list[str]:
    """Mark this host's RUNNING runs whose process is gone as KILLED; returns their ids."""
    host = socket.gethostname()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    running = client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=1000)
    fixed = []
    for run in running:
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, WHY_TAG, f"its process (pid {pid} on {host}) ended without closing "
                       f"the run: SIGKILL, out of memory or a crash; marked by {found_by or 'optipipe'}")
        client.set_terminated(run.info.run_id, status="KILLED")
        fixed.append(run.info.run_id)
    return fixed
