"""Hydra callback: a ``--multirun`` sweep gets one parent MLflow run; every job nests under it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline import stale_runs
from pipeline.config import TrackerSettings, typed
from pipeline.redact import redact, redact_overrides
from pipeline.tracking import (PARENT_ENV, SWEEP_SIGNATURE, _client, experiment_id, sweep_signature,
                               tracker_problems, tracking_uri)


_active: list["MlflowSweep"] = []  # the sweep of this process, for close_open_parent


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.run_id: str | None = None
        self.uri: str | None = None
        self.sweep_dir: Path | None = None
        _active.append(self)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        params = config.hydra.sweeper.get("params") or {}  # an experiment's own sweep (hydra.sweeper.params)
        arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        check_every_point(arguments)
        settings, problems = typed(TrackerSettings, config.get("tracker"), "tracker")
        if problems or settings.kind != "mlflow" or tracker_problems(settings):
            return  # each job reports the problem itself, with exit code 2
        self.uri = tracking_uri(settings)
        client = _client(self.uri)
        exp = experiment_id(client, settings.experiment, self.uri)
        sweep = redact_overrides(list(config.hydra.overrides.task))
        name = settings.run_name or ("sweep " + " ".join(sweep))[:250]
        run = client.create_run(exp, run_name=name, tags={"optipipe.sweep": "true",
                                                          "optipipe.sweep_dir": str(config.hydra.sweep.dir),
                                                          SWEEP_SIGNATURE: sweep_signature(arguments),
                                                          **stale_runs.owner_tags()})
        client.log_param(run.info.run_id, "sweep.overrides", " ".join(sweep)[:6000])
        # how the jobs ran (hydra/launcher=joblib hydra.launcher.n_jobs=4): part of the command a report repeats
        launch = [o for o in config.hydra.overrides.hydra if not o.startswith("hydra.mode=")]
        if launch:
            client.log_param(run.info.run_id, "sweep.hydra_overrides", " ".join(redact_overrides(launch))[:6000])
        self.run_id = run.info.run_id
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        os.environ[PARENT_ENV] = self.run_id  # jobs (in-process or spawned later) nest under it
        print(f"optipipe: sweep parent run {self.run_id}", flush=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        scrub_multirun_yaml(Path(str(config.hydra.sweep.dir)))

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


def scrub_multirun_yaml(sweep_dir: Path) -> None:
    """Hydra saves the sweep's config as typed into ``multirun.yaml`` before the first job starts;
    rewrite it with secrets masked (idempotent: every job may call it, in whichever process)."""
    from omegaconf import OmegaConf

    path = sweep_dir / "multirun.yaml"
    if path.is_file():
        text = OmegaConf.to_yaml(redact(OmegaConf.to_container(OmegaConf.load(path), resolve=False)))
        if text != path.read_text():
            path.write_text(text)


def sweep_points(overrides: list[str]) -> list[list[str]] | None:
    """Every job's overrides, as the basic sweeper will run them (a cartesian product of the
    comma lists and range()/choice() values); None when a search sweeper's intervals decide them."""
    import itertools

    from pipeline.hydra_guard import sweep_axes

    # launcher/sweeper settings (hydra.*): nothing of ours to validate
    axes = [values for key, values in sweep_axes(overrides) if not key.startswith("hydra")]
    if any(values is None for values in axes):
        return None
    return [list(p) for p in itertools.product(*axes)]


def check_every_point(overrides: list[str]) -> None:
    """One bad value in a sweep stops it before its first job: every problem of every point is
    listed (the point named), exit code 2, nothing loaded, no parent run written."""
    import sys

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline import console
    from pipeline.config import compose
    from pipeline.contract import ConfigProblems, Problem
    from pipeline.validate import resolve

    points = sweep_points(overrides) or []
    varying = {o.split("=", 1)[0] for p in points for o in p if any(o not in q for q in points)}
    where: dict[tuple[str, str, str], list[str]] = {}  # one problem → the points it occurs at
    for point in points:
        label = " ".join(o for o in point if o.split("=", 1)[0] in varying)
        try:
            resolve(compose(point))
        except ConfigProblems as e:
            for p in e.problems:
                if p.severity != "warning":
                    where.setdefault((p.key, p.message, p.fix), []).append(label)
        except (HydraException, OmegaConfBaseException) as e:  # e.g. a key that only one point misspells
            first = str(e).strip().splitlines()[0][:300]
            where.setdefault(("sweep", f"does not compose: {first}", "fix or drop that value"), []).append(label)
    if where:
        console.print_problems([Problem(key, f"{msg} (sweep point{'s' if len(at) > 1 else ''}: "
                                        f"{'every one' if len(at) == len(points) else ', '.join(at)})", fix)
                                for (key, msg, fix), at in where.items()])
        console.err.print(f"optipipe: the sweep has {len(points)} points; none was run")
        sys.exit(2)


def close_open_parent(status: str) -> None:
    """Hydra skips on_multirun_end when a job failed or Ctrl-C came: end the parent run anyway."""
    for callback in _active:
        callback.close(status)
