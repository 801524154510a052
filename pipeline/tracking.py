"""Tracking: one MLflow run per job, nested under one parent run per ``--multirun`` sweep.

Stages never import mlflow; the runner hands results to a tracker. ``tracker=none`` uses
``NullTracker`` and mlflow is never imported.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline import stale_runs
from pipeline.config import TrackerSettings
from pipeline.redact import is_secret_key, redact_text
from pipeline.contract import Problem, StageResult

PARENT_ENV = "OPTIPIPE_PARENT_RUN_ID"  # set by the sweep callback, read by each job of the sweep
SWEEP_SIGNATURE = "optipipe.sweep_signature"  # a sweep parent's tag: which sweep it ran (its arguments)
RESUME_KEYS = ("resume", "resume_from")  # pipeline.* keys that say how to run a sweep, not what it measures


def sweep_signature(arguments: list[str]) -> str:
    """The sweep that these command-line/experiment arguments define, as a short hash: the same
    sweep started again (e.g. to finish one that was cut) has the same signature, whatever order
    the arguments came in and whether it asks to resume."""
    import hashlib

    kept = sorted(a for a in arguments if a.split("=", 1)[0].lstrip("+~") not in
                  {f"pipeline.{k}" for k in RESUME_KEYS})
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:20]
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


@dataclass
class JobInfo:
    """What the tracker needs to open a job's run; built by the CLI from Hydra's runtime."""

    run_name: str
    params: dict[str, Any]
    tags: dict[str, str]
    artifacts: list[Path] = field(default_factory=list)  # config YAML, overrides, environment
    parent_run_id: str | None = None


def default_store_uri(base: Path | None = None) -> str:
    """SQLite under ./outputs, as an absolute path so every job of a sweep writes the same store."""
    base = (base or Path.cwd() / "outputs").resolve()
    return f"sqlite:///{base / 'mlflow.db'}"


def tracking_uri(settings: TrackerSettings) -> str:
    return settings.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store_uri()


def dashboard_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def tracker_problems(settings: TrackerSettings) -> list[Problem]:
    """Fail fast on an unreachable store: seconds, not the minutes of MLflow's retry loop."""
    if settings.kind == "none":
        return []
    if settings.kind != "mlflow":
        return [Problem("tracker.kind", f"unknown tracker {settings.kind!r}", "tracker=mlflow or tracker=none")]
    if not settings.connect_timeout_s > 0:
        return [Problem("tracker.connect_timeout_s", f"must be > 0 seconds, got {settings.connect_timeout_s}",
                        "tracker.connect_timeout_s=5")]
    uri = tracking_uri(settings)
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=settings.connect_timeout_s).raise_for_status()
        except requests.RequestException as e:
            return [Problem("tracker.uri", f"MLflow server {uri} is unreachable ({type(e).__name__})",
                            "start it (mlflow server --host 127.0.0.1 --port 5000), fix tracker.uri / "
                            "MLFLOW_TRACKING_URI, or run with tracker=none")]
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return [Problem("tracker.uri", f"cannot create {folder} for the SQLite store: {e}",
                            "tracker.uri=sqlite:///<writable path>/mlflow.db")]
        return sqlite_store_problems(Path(uri.removeprefix("sqlite:///")))
    return []


def sqlite_store_problems(path: Path) -> list[Problem]:
    """An existing SQLite store must open and be writable: found now, not as a traceback after the
    model has loaded. (A missing one is created by the first run.)"""
    import sqlite3

    if not path.exists():
        return []
    fix = f"move {path} aside, or tracker.uri=sqlite:///<another path>/mlflow.db"
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(path.parent, os.W_OK):
        return [Problem("tracker.uri", f"the SQLite store {path} is read-only for this user", fix)]
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            db.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as e:
        if "locked" in str(e):  # busy with another job's write: fine, the run will wait its turn
            return []
        return [Problem("tracker.uri", f"{path} is not a usable SQLite store ({e})", fix)]
    return []


class Tracker(Protocol):
    where: str

    lost: str | None  # why tracking stopped mid-run (None: it did not)

    def start(self, job: JobInfo) -> None: ...
    def log_result(self, stage: str, result: StageResult) -> None: ...
    def finish(self, status: str, error: str | None = None) -> None: ...

    # pipeline.resume: the id of an earlier finished run that can stand in for this job, if any
    def finished_run(self, config_hash: str, sweep_run_id: str, from_sweep: str | None = None) -> str | None: ...


class NullTracker:
    """tracker=none: nothing is recorded, mlflow is not imported."""

    where = "not tracked (tracker=none)"
    run_id = None
    lost = None

    def start(self, job: JobInfo) -> None:
        pass

    def log_result(self, stage: str, result: StageResult) -> None:
        pass

    def finish(self, status: str, error: str | None = None) -> None:
        pass

    def finished_run(self, config_hash: str, sweep_run_id: str, from_sweep: str | None = None) -> str | None:
        return None  # nothing recorded, nothing to resume from


LOCKED_RETRIES = 6  # a loaded machine's parallel writers can hold the SQLite lock past its busy wait


def _client(uri: str):
    """A client whose store exists. A new SQLite store creates its schema on first use; several
    jobs doing that at once (a parallel sweep's first jobs) broke the store for every later run,
    so the first use is serialized with a lock file beside the database."""
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock

    with FileLock(uri.removeprefix("sqlite:///") + ".lock", timeout=300):
        for attempt in range(LOCKED_RETRIES - 1):
            try:
                return _checked_client(uri)
            except Exception as e:  # SQLite's 5 s busy wait can run out while parallel jobs write
                if "database is locked" not in str(e):
                    raise
                time.sleep(1 + attempt)
        return _checked_client(uri)  # the last try: its error is the caller's


def _checked_client(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    client.search_experiments(max_results=1)  # creates or checks the schema, one process at a time
    return client


def experiment_id(client, name: str, uri: str) -> str:
    """Get or create the experiment; a local store keeps artifacts beside its database."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # a parallel job created it first
        return client.get_experiment_by_name(name).experiment_id


def fail_fast_over_http(timeout_s: float) -> None:
    """MLflow's HTTP client retries a dead server for minutes (7 retries, backoff ×2, 120 s per
    request); a run should learn within ``tracker.connect_timeout_s`` that its server is gone.
    Settings a user exported themselves are kept."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout_s))))


def _survives_a_lost_server(method):
    """A tracking call that fails mid-run (server gone, disk full) does not end the run: the run
    goes on untracked, its results stay in the run folder, and ``lost`` says why (the CLI then
    exits non-zero with it)."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if self.lost:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            first_line = (str(e).strip().splitlines() or [""])[0]
            self.lost = f"{type(e).__name__}: {redact_text(first_line)[:300]}"
            print(f"optipipe: tracking failed, the run goes on untracked ({self.lost})", file=sys.stderr, flush=True)
            return None
    return guarded


class MlflowTracker:
    def __init__(self, settings: TrackerSettings) -> None:
        self.settings = settings
        self.uri = tracking_uri(settings)
        self.where = redact_text(dashboard_command(self.uri))
        if self.uri.startswith(("http://", "https://")):
            fail_fast_over_http(settings.connect_timeout_s)
        self.client = _client(self.uri)
        self.run_id: str | None = None
        self.lost: str | None = None  # why tracking stopped mid-run (None: it did not)

    @_survives_a_lost_server
    def start(self, job: JobInfo) -> None:
        from mlflow.entities import Param, RunTag

        exp = experiment_id(self.client, self.settings.experiment, self.uri)
        tags = {"mlflow.runName": job.run_name, **job.tags, **stale_runs.owner_tags()}
        if job.parent_run_id:
            tags["mlflow.parentRunId"] = job.parent_run_id
        run = self.client.create_run(exp, tags=tags, run_name=job.run_name)
        self.run_id = run.info.run_id
        try:  # runs of this store left RUNNING by a killed process: KILLED now, with the reason
            stale_runs.repair(self.client, [exp], found_by=f"run {self.run_id}")
        except Exception as e:  # somebody else's broken run never fails this one
            print(f"optipipe: could not check for runs left RUNNING ({type(e).__name__}: {e})", file=sys.stderr)
        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in job.params.items() if not is_secret_key(k)]
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        for path in job.artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.log_batch(self.run_id, tags=[RunTag("optipipe.status", "running")])

    def finished_run(self, config_hash: str, sweep_run_id: str, from_sweep: str | None = None) -> str | None:
        """A FINISHED job with this resolved config from an earlier run of the sweep ``sweep_run_id``
        runs (same signature), or from the sweep ``from_sweep`` names; newest first."""
        exp = self.client.get_experiment_by_name(self.settings.experiment)
        if exp is None:
            return None
        found = self.client.search_runs([exp.experiment_id], max_results=200, order_by=["attributes.start_time DESC"],
                                        filter_string=f"tags.`optipipe.config_hash` = '{config_hash}' "
                                                      "and attributes.status = 'FINISHED'")
        wanted = self._signature(sweep_run_id)
        for run in found:
            parent = run.data.tags.get("mlflow.parentRunId")
            if parent is None or parent == sweep_run_id:
                continue  # a single run, or a job of this very sweep
            if (parent == from_sweep) if from_sweep else (wanted is not None and self._signature(parent) == wanted):
                return run.info.run_id
        return None

    def _signature(self, run_id: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).data.tags.get(SWEEP_SIGNATURE)
        except MlflowException:  # a parent deleted since
            return None

    def note_reused(self, parent_run_id: str, job: int, run_id: str) -> None:
        """The sweep's report lists a skipped job's earlier run in its place."""
        self.client.set_tag(parent_run_id, f"optipipe.reused.{job}", run_id)

    @_survives_a_lost_server
    def log_result(self, stage: str, result: StageResult) -> None:
        from mlflow.entities import RunTag

        self.log_metrics({**{f"{stage}/{k}": v for k, v in result.metrics.items()},
                          f"{stage}/stage_seconds": result.seconds})
        tags = [RunTag(k, redact_text(str(v))[:5000]) for k, v in result.tags.items()]
        if tags:
            self.client.log_batch(self.run_id, tags=tags)
        for path in result.artifacts:
            self.client.log_artifact(self.run_id, str(path))

    @_survives_a_lost_server
    def log_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), stamp, 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    @_survives_a_lost_server
    def finish(self, status: str, error: str | None = None) -> None:
        if self.run_id is None:
            return
        self.client.set_tag(self.run_id, "optipipe.status", status.lower())
        if error:
            self.client.set_tag(self.run_id, "optipipe.error", redact_text(error)[:5000])
        self.client.set_terminated(self.run_id, status=status)


def make_tracker(settings: TrackerSettings) -> Tracker:
    return NullTracker() if settings.kind == "none" else MlflowTracker(settings)



