"""A new SQLite store used by several processes at once (a parallel sweep's first jobs, the
multi-GPU table's side-by-side rows): every process succeeds and the store stays usable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, mlflow_runs

FIRST_USE = """
import sys

import pytest
from pipeline.tracking import _client, experiment_id
client = _client(sys.argv[1])
run = client.create_run(experiment_id(client, "parallel", sys.argv[1]))
client.set_terminated(run.info.run_id)
"""


def test_four_processes_create_one_new_store_at_once(tmp_path):
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE, f"sqlite:///{db}"], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    failures = [p.stderr.read()[-2000:] for p in procs if p.wait(timeout=600) != 0]
    assert not failures, failures[0]
    _, runs = mlflow_runs(db)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}


def test_a_store_locked_by_parallel_writers_is_waited_for(tmp_path, monkeypatch):
    """SQLite's own busy wait (5 s) can run out on a loaded machine while other jobs write: the
    first use of the store is retried, not turned into a failed job."""
    import mlflow.tracking

    from pipeline import tracking

    calls = []

    class Flaky:
        def __init__(self, tracking_uri):
            pass

        def search_experiments(self, max_results):
            calls.append(1)
            if len(calls) < 3:
                raise RuntimeError("(sqlite3.OperationalError) database is locked")

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", Flaky)
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    assert isinstance(tracking._client(f"sqlite:///{tmp_path}/m.db"), Flaky) and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(Flaky, "search_experiments", lambda self, max_results: (_ for _ in ()).throw(ValueError("other")))
    with pytest.raises(ValueError):  # any other error is not retried
        tracking._client(f"sqlite:///{tmp_path}/m.db")
