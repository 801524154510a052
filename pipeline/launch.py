"""launcher=torchrun: the parent re-runs this job under torch.distributed.run and waits
(``launch_job``); each rank runs the stages (``run_worker``, with pipeline.distributed).

The parent validated the config and created the MLflow run; it hands the workers the run id and
the validated configuration (``pipeline.worker``: no second composition or validation per rank),
writes into the same output dir, never touches CUDA itself, and
ends the run with the group's outcome: FINISHED, FAILED with the failing rank's own message, or
KILLED on Ctrl-C. Any rank that fails makes torchrun stop the others; a rank stuck in a collective
fails after ``launcher.collective_timeout_s``; ``launcher.max_seconds`` bounds the whole group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig

from pipeline import quiet_timing
from pipeline.config import LauncherSettings
from pipeline.contract import CONFIG_ENV, RUN_ENV, Placement, StageResult, handed_over
from pipeline.distributed import ERROR_FILE, URI_ENV
from pipeline.environment import gpu_count
from pipeline.gpu_lease import gpu_lease, lock_folder
from pipeline.gpus import visible_entries
from pipeline.stopping import interrupted_why, raise_terminated

OUTCOME_FILE = "outcome.json"  # rank 0 writes the aggregated stage results here
GRACE_S = 15.0  # after SIGTERM, how long ranks get to exit before SIGKILL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def job_devices(settings: LauncherSettings, holder: str = "") -> Iterator[str | None]:
    """CUDA_VISIBLE_DEVICES for this job while it runs: given, a group of GPUs leased for it in a
    sweep whose jobs run side by side (``split_devices``: see pipeline.gpu_lease), or None (inherit)."""
    if settings.devices:
        yield ",".join(str(d) for d in settings.devices)
    elif not settings.split_devices:
        yield None
    else:
        # one lock file per GPU however the variable is spelled (" 1" is GPU 1)
        ids = [e for e in visible_entries() or [] if e] or [str(i) for i in range(gpu_count())]
        with gpu_lease(ids, settings.nproc_per_node, holder=holder) as group:
            yield ",".join(group)


def torchrun_command(settings: LauncherSettings, output_dir: Path) -> list[str]:
    """torchrun starting ``pipeline.worker`` on every rank (its configuration comes in the environment)."""
    endpoint = settings.rdzv_endpoint or f"127.0.0.1:{free_port()}"
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={settings.nproc_per_node}",
            f"--nnodes={settings.nnodes}", f"--node_rank={settings.node_rank}",
            f"--rdzv_backend={settings.rdzv_backend}", f"--rdzv_endpoint={endpoint}",
            f"--rdzv_id={settings.rdzv_id}", "--max_restarts=0", "-m", "pipeline.worker", str(output_dir)]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun and every worker, then SIGKILL what is left: no orphans."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when its parent dies, however it dies (SIGKILL included), so a
    torchrun group never outlives the process that tracks it. Linux only (``prctl``); elsewhere
    the group ends with its collective timeout or ``launcher.max_seconds``."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)


def run_group(cfg: DictConfig, settings: LauncherSettings, output_dir: Path, run_id: str | None,
              tracker_uri: str | None) -> tuple[str, str | None]:
    """(status, error) of the whole group; every rank runs the validated ``cfg``."""
    for stale in output_dir.glob(ERROR_FILE.format(rank="*")):
        stale.unlink()
    (output_dir / OUTCOME_FILE).unlink(missing_ok=True)
    env = {**os.environ, RUN_ENV: run_id or "untracked", URI_ENV: tracker_uri or "", CONFIG_ENV: handed_over(cfg)}
    # SIGTERM (a scheduler's cancel, `timeout`), also while waiting for GPUs, ends the run KILLED and
    # must not orphan the group in its own session
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with job_devices(settings, holder=str(output_dir)) as devices:
            if devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = devices
            if settings.split_devices and settings.quiet_timing:  # leased beside other jobs
                env[quiet_timing.ENV] = str(lock_folder() / quiet_timing.FILE_NAME)
            return _run_torchrun(settings, output_dir, env, devices)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_torchrun(settings: LauncherSettings, output_dir: Path, env: dict[str, str],
                  devices: str | None) -> tuple[str, str | None]:
    cmd = torchrun_command(settings, output_dir)
    print(f"optipipe: torchrun ×{settings.nproc_per_node * settings.nnodes}"
          + (f" on GPUs {devices}" if devices else ""), flush=True)
    parent = os.getpid()
    # Ctrl-C reaches us, not the ranks; if we die (even by SIGKILL), torchrun gets SIGTERM and stops them
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=lambda: die_with_parent(parent))
    try:
        code = proc.wait(timeout=settings.max_seconds)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        return "FAILED", f"the group ran past launcher.max_seconds={settings.max_seconds} and was stopped"
    except KeyboardInterrupt:
        stop_group(proc)
        raise
    if code == 0:
        return "FINISHED", None
    return "FAILED", rank_errors(output_dir) or f"torchrun exited with code {code}; the ranks' output is above"


def rank_errors(output_dir: Path) -> str:
    """The failing ranks' own messages, rank by rank."""
    found = sorted(output_dir.glob(ERROR_FILE.format(rank="*")))
    return "\n".join(f"{p.stem}: {p.read_text().strip()}" for p in found)


def write_outcome(output_dir: Path, results: dict[str, StageResult]) -> None:
    data = {name: {"metrics": r.metrics, "summary": r.summary, "seconds": r.seconds} for name, r in results.items()}
    (output_dir / OUTCOME_FILE).write_text(json.dumps(data))


def read_outcome(output_dir: Path) -> dict[str, StageResult]:
    path = output_dir / OUTCOME_FILE
    if not path.is_file():
        return {}
    return {name: StageResult(metrics=d["metrics"], summary=d["summary"], seconds=d["seconds"])
            for name, d in json.loads(path.read_text()).items()}


def launch_job(resolved, output_dir: Path, tracker, job):
    """The parent's whole job: start the run, run the group, end the run with its outcome."""
    from pipeline.runner import RunOutcome, finish_run

    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        tracker.start(job)  # inside: a Ctrl-C while the run is being created still ends it KILLED
        status, error = run_group(resolved.cfg, resolved.launcher, output_dir, getattr(tracker, "run_id", None),
                                  getattr(tracker, "uri", None))
    except KeyboardInterrupt as e:
        finish_run(tracker, "KILLED", interrupted_why(e))
        raise
    finish_run(tracker, status, error)
    return RunOutcome(results=read_outcome(output_dir), status=status, error=error)


def run_worker(resolved, output_dir: Path) -> None:
    """One rank: join the group, plan (TP needs the group), run every stage, report through rank 0."""
    from pipeline.distributed import RankTracker, join_group, leave_group
    from pipeline.runner import execute, make_plan

    die_with_parent(os.getppid())  # and a rank stops when its torchrun agent dies
    dist_info = join_group(resolved.launcher.collective_timeout_s)
    try:
        plan = make_plan(resolved)
        shard = resolved.stages["shard"]
        per_replica = shard.ranks_per_replica(dist_info.world_size) if isinstance(shard, Placement) else 1
        tracker = RankTracker(dist_info, output_dir, per_replica)
        outcome = execute(resolved, plan, output_dir, tracker, job=None, dist=dist_info)
        if dist_info.is_main and outcome.status == "FINISHED":
            write_outcome(output_dir, tracker.results)
    finally:
        left = leave_group()
    if not left:
        print(f"optipipe: rank {dist_info.rank}: process group teardown timed out", flush=True)
    # Everything is logged and written. Leave without the interpreter's teardown: on GPUs,
    # tensor-parallel ranks with a captured decode graph have been seen to finish their work and
    # not exit (the cause is not pinned down), holding the group and its GPUs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if outcome.status == "FINISHED" else 1)
