"""Hydra callback: a ``--multirun`` sweep gets one parent MLflow run; every job nests under it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.config import TrackerSettings, typed
from pipeline.tracking import PARENT_ENV, _client, experiment_id, tracker_problems, tracking_uri


_active: list["MlflowSweep"] = []  # the sweep of this process, for close_open_parent


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.uri: str | None = None
        self.sweep_dir: Path | None = None
        _active.append(self)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        settings, problems = typed(TrackerSettings, config.get("tracker"), "tracker")
        if problems or settings.kind != "mlflow" or tracker_problems(settings):
            return  # each job reports the problem itself, with exit code 2
        self.uri = tracking_uri(settings)
        client = _client(self.uri)
        exp = experiment_id(client, settings.experiment, self.uri)
        sweep = list(config.hydra.overrides.task)
        name = settings.run_name or ("sweep " + " ".join(sweep))[:250]
        run = client.create_run(exp, run_name=name, tags={"optipipe.sweep": "true",
                                                          "optipipe.sweep_dir": str(config.hydra.sweep.dir)})
        client.log_param(run.info.run_id, "sweep.overrides", " ".join(sweep)[:6000])
        self.run_id = run.info.run_id
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        os.environ[PARENT_ENV] = self.run_id  # jobs (in-process or spawned later) nest under it
        print(f"optipipe: sweep parent run {self.run_id}", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.close("FINISHED")

    def close(self, status: str) -> None:
        """End the parent run with the sweep's status; ``status`` FINISHED even if jobs failed."""
        if self.run_id is None:
            return
        client = _client(self.uri)
        children = client.search_runs([client.get_run(self.run_id).info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{self.run_id}'")
        failed = [r for r in children if r.info.status != "FINISHED"]
        client.set_tag(self.run_id, "optipipe.jobs", str(len(children)))
        client.set_tag(self.run_id, "optipipe.jobs_failed", str(len(failed)))
        self.summarize(client)
        client.set_terminated(self.run_id, status=status)
        os.environ.pop(PARENT_ENV, None)
        self.run_id = None


    def summarize(self, client) -> None:
        """Comparison table, CSV and plots on the parent run; table and best override on the console."""
        from pipeline import report

        rows = report.sweep_rows(client, self.run_id)
        if not rows:
            return
        files = report.write(rows, (self.sweep_dir or Path.cwd()) / "report")
        for path in files:
            client.log_artifact(self.run_id, str(path), artifact_path="report")
        print("\n" + report.markdown(rows) + "\n\n" + report.best_line(rows), flush=True)


def close_open_parent(status: str) -> None:
    """Hydra skips on_multirun_end when a job failed or Ctrl-C came: end the parent run anyway."""
    for callback in _active:
        callback.close(status)
