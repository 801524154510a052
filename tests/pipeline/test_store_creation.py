"""A new SQLite store used by several processes at once (a parallel sweep's first jobs, the
multi-GPU table's side-by-side rows): every process succeeds and the store stays usable."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT, mlflow_runs

FIRST_USE = """
import sys
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
