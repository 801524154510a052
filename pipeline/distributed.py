"""Inside a torchrun worker: join the group, and turn every rank's numbers into one tracked run.

The job's parent process owns the MLflow run (it creates it before launching and ends it after the
group exits), so a rank that dies cannot leave it half-open. Workers only add to it: every rank's
stage metrics are gathered after each stage, and rank 0 logs them as ``rank{r}/<stage>/<metric>``
plus one aggregate under the usual name (throughput summed over replicas, memory and latency the
worst rank), so sweeps, reports and the dashboard read a multi-GPU run like any other.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.contract import MEAN, RANK0, REPLICA_SUM, RUN_ENV, WORST, DistInfo, StageResult, local_rank

URI_ENV = "OPTIPIPE_WORKER_TRACKER_URI"
ERROR_FILE = "rank{rank}.error"


def join_group(timeout_s: float) -> DistInfo:
    """Initialise the process group torchrun described in the environment (NCCL on GPUs, else gloo)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": torch.device("cuda", local_rank())} if cuda else {}))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank(),
                    device=f"cuda:{local_rank()}" if cuda else "cpu")


TEARDOWN_S = 30.0


def leave_group() -> bool:
    """Leave the group once every result is logged. On GPUs the group is not destroyed: NCCL's
    teardown of communicators that CUDA graphs (and symmetric memory) still reference outlasted
    ``TEARDOWN_S`` on tensor-parallel jobs, and the caller exits the process at once anyway, which
    frees them. Elsewhere (gloo) the teardown is bounded. False: it did not finish in time."""
    import threading

    import torch.distributed as dist

    if not dist.is_initialized():
        return True
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return True
    done = threading.Event()

    def destroy() -> None:
        dist.destroy_process_group()
        done.set()

    threading.Thread(target=destroy, daemon=True).start()
    return done.wait(TEARDOWN_S)


def aggregate(how: str, values: list[float], ranks_per_replica: int) -> float:
    """One number for the run from every rank's value of a metric that combines ``how``
    (``pipeline.contract.ACROSS_RANKS``, declared by the stage that measured it)."""
    if how == REPLICA_SUM:
        return sum(values) / ranks_per_replica  # replicas add up; ranks of one replica share tokens
    if how == WORST:
        return max(values)
    if how == MEAN:
        return sum(values) / len(values)
    return values[0]


class RankTracker:
    """The tracker of a worker: gathers every rank's stage result; rank 0 logs into the parent's run."""

    def __init__(self, dist_info: DistInfo, output_dir: Path, ranks_per_replica: int) -> None:
        from pipeline.config import TrackerSettings
        from pipeline.tracking import MlflowTracker

        self.dist, self.output_dir, self.ranks_per_replica = dist_info, output_dir, ranks_per_replica
        self.inner = None
        if dist_info.is_main and os.environ.get(URI_ENV):
            self.inner = MlflowTracker(TrackerSettings(uri=os.environ[URI_ENV]))
            self.inner.run_id = os.environ[RUN_ENV]
        self.where, self.run_id = "", os.environ.get(RUN_ENV)
        self.results: dict[str, StageResult] = {}  # aggregated, for rank 0's summary

    def start(self, job: Any) -> None:  # the parent started the run
        return None

    def log_result(self, stage: str, result: StageResult) -> None:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, (result.metrics, [str(p) for p in result.artifacts]))
        if not self.dist.is_main:
            return
        combined = StageResult(tags=dict(result.tags), seconds=result.seconds, summary=result.summary,
                               across_ranks=dict(result.across_ranks))
        names = sorted({k for metrics, _ in gathered for k in metrics})
        for name in names:
            values = [metrics[name] for metrics, _ in gathered if name in metrics]
            how = result.across_ranks.get(name, RANK0)
            combined.metrics[name] = aggregate(how, values, self.ranks_per_replica)
        per_rank = {f"rank{rank}/{stage}/{name}": value
                    for rank, (metrics, _) in enumerate(gathered) for name, value in metrics.items()}
        for _, files in gathered:  # every rank's files (e.g. its samples) on the one shared run
            combined.artifacts += [Path(f) for f in files if Path(f).is_file() and Path(f) not in combined.artifacts]
        for key, unit in (("decode_tokens_per_s", "tok/s"), ("sequences_per_s", "seq/s")):
            if key in combined.metrics:  # the console line speaks for the whole group, not rank 0
                combined.summary += f" · all {self.dist.world_size} ranks: {combined.metrics[key]:.1f} {unit}"
        self.results[stage] = combined
        if self.inner is not None:
            self.inner.log_result(stage, combined)
            self.inner.log_metrics(per_rank)

    def finish(self, status: str, error: str | None = None) -> None:
        """The parent ends the run; a failing rank leaves its reason where the parent reads it."""
        if status != "FINISHED" and error:
            (self.output_dir / ERROR_FILE.format(rank=self.dist.rank)).write_text(error)
