"""Sweep summary and ``optipipe report`` from a real 4-job CPU sweep."""

from __future__ import annotations

import pytest

import csv
import io

from pipeline import report, report_cli
from tests.conftest import TINY, composed, mlflow_runs, run_cli


def fake(run_id, tok_s, mem, gate="not set", status="FINISHED"):
    return report.Row(run_id, f"x={run_id}", status, gate, {"tokens_per_s": tok_s, "peak_memory_gib": mem})


def test_pareto_front_and_best_respect_the_gate():
    rows = [fake("a", 100, 1.0), fake("b", 200, 2.0), fake("c", 150, 3.0), fake("d", 300, 4.0, gate="fail"),
            fake("e", 999, 0.5, status="FAILED")]
    assert [r.run_id for r in report.pareto(rows)] == ["a", "b", "d"]
    assert report.best(rows).run_id == "b"  # d is faster but failed its gate; e failed outright
    assert report.best_line(rows).startswith("best: optipipe x=b")
    assert report.short_labels([fake("a", 1, 1), fake("b", 1, 1)]) == ["x=a", "x=b"]


def test_plot_labels_keep_every_varied_override_whole():
    """A scaling sweep's jobs differ in the last characters of a long label: a plot must show them."""
    rows = [report.Row(f"{shard}{n}", f"shard={shard} launcher.nproc_per_node={n} generate.batch_size=32",
                       "FINISHED", "not set", {}) for shard, n in (("tensor_parallel", 4), ("data_parallel", 1),
                                                                   ("data_parallel", 4))]
    labels = [report.plot_label(label) for label in report.short_labels(rows)]
    assert labels == ["shard=tensor_parallel\nlauncher.nproc_per_node=4", "shard=data_parallel\nlauncher.nproc_per_node=1",
                      "shard=data_parallel\nlauncher.nproc_per_node=4"]
    assert report.plot_label("quantize=nf4 (reused)") == "quantize=nf4 (reused)"


def test_four_job_sweep_summary_and_report_agree(tmp_path, capsys):
    proc = run_cli("-m", *TINY, "quantize=none,nf4", "generate.batch_size=1,2", "evaluate=perplexity",
                   cwd=tmp_path, check=0)
    assert "best: optipipe" in proc.stdout and "| overrides |" in proc.stdout
    client, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    parent = next(r for r in runs if r.data.tags.get("optipipe.sweep") == "true")
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert names == {"report/summary.md", "report/summary.csv", "report/throughput_vs_memory.png",
                     "report/latency_percentiles.png"}
    logged = client.download_artifacts(parent.info.run_id, "report/summary.csv", str(tmp_path))
    table = list(csv.DictReader(io.StringIO(open(logged).read())))
    assert len(table) == 4 and all(float(r["tokens_per_s"]) > 0 and float(r["perplexity"]) > 1 for r in table)

    again = run_cli("report", "--parent", parent.info.run_id, "--out", str(tmp_path / "again"), cwd=tmp_path, check=0)
    assert (tmp_path / "again" / "summary.csv").read_text() == open(logged).read()
    # the rest in process (report_cli.main is what `optipipe report` runs; the CLI path is shown above)
    uri = ["--uri", f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"]
    assert report_cli.main(["--experiment", "optipipe", "--out", str(tmp_path / "latest"), *uri]) == 0
    assert parent.info.run_id in capsys.readouterr().out and "best: optipipe" in again.stdout
    # the same table into a marked section of a Markdown file, headed by where it comes from
    doc = tmp_path / "RESULTS.md"
    doc.write_text("intro\n<!-- cpu:begin -->\nold\n<!-- cpu:end -->\nrest\n")
    assert report_cli.main(["--parent", parent.info.run_id, "--into", str(doc), "--section", "cpu", *uri]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n<!-- cpu:begin -->\n`optipipe -m ") and text.endswith("<!-- cpu:end -->\nrest\n")
    assert "CPU (" in text and "torch " in text and parent.info.run_id in text and "best: optipipe" in text
    assert "\nold\n" not in text and sum(line.startswith("| ") and "quantize=" in line for line in text.splitlines()) == 4
    capsys.readouterr()
    assert report_cli.main(["--parent", parent.info.run_id, "--into", str(doc), "--section", "gpu",
                            "--out", str(tmp_path / "wrong"), *uri]) == 2
    assert "no <!-- gpu:begin -->" in capsys.readouterr().out and not (tmp_path / "wrong").exists()  # nothing written


def test_a_sweep_over_processes_is_compared_with_one_process(tmp_path):
    def job(nproc, shard, batch, tok_s, status="FINISHED"):
        return report.Row(f"{shard}{nproc}b{batch}", f"shard={shard} launcher.nproc_per_node={nproc} "
                          f"generate.batch_size={batch}", status, "not set", {"tokens_per_s": tok_s})

    rows = report.with_scaling([job(1, "tp", 1, 100), job(2, "tp", 1, 150), job(4, "dp", 1, 0, "FAILED"),
                                job(1, "tp", 32, 990), job(1, "dp", 32, 1000), job(4, "dp", 32, 4000)])
    got = {r.run_id: r.values.get("x_one_process") for r in rows}
    # against the fastest one-process row of the same batch, whichever shard it used; failed rows get none
    assert got == {"tp1b1": 1.0, "tp2b1": 1.5, "dp4b1": None, "tp1b32": 0.99, "dp1b32": 1.0, "dp4b32": 4.0}
    assert "x_one_process" in report.markdown(rows).splitlines()[0]
    flat = report.with_scaling([fake("a", 100, 1.0), fake("b", 200, 2.0)])  # not a sweep over processes
    assert "x_one_process" not in report.markdown(flat)
    # one line per shard and batch; the failed job is no point
    assert report.scaling_lines(rows) == {"shard=tp generate.batch_size=1": [(1, 1.0), (2, 1.5)],
                                          "shard=dp generate.batch_size=32": [(1, 1.0), (4, 4.0)],
                                          "shard=tp generate.batch_size=32": [(1, 0.99)]}
    assert "scaling.png" in {p.name for p in report.plots(rows, tmp_path)}
    assert "scaling.png" not in {p.name for p in report.plots(flat, tmp_path / "flat")}


def test_a_resumed_sweeps_new_jobs_are_compared_and_plotted_with_its_reused_ones():
    """The jobs a resumed sweep runs carry ``pipeline.resume=True``; those it reuses do not."""
    def job(nproc, batch, tok_s, resumed):
        overrides = f"shard=tp launcher.nproc_per_node={nproc} generate.batch_size={batch} tracker.uri=sqlite:///s.db"
        return report.Row(f"{nproc}b{batch}", overrides + (" ++pipeline.resume=True" if resumed else ""),
                          "FINISHED", "not set", {"tokens_per_s": tok_s}, reused=not resumed)

    rows = report.with_scaling([job(1, 1, 200, False), job(1, 32, 5000, False), job(4, 1, 450, True),
                                job(4, 32, 10000, True)])
    assert {r.run_id: r.values["x_one_process"] for r in rows} == {"1b1": 1.0, "1b32": 1.0, "4b1": 2.25, "4b32": 2.0}
    assert report.scaling_lines(rows) == {"generate.batch_size=1": [(1, 1.0), (4, 2.25)],
                                          "generate.batch_size=32": [(1, 1.0), (4, 2.0)]}
    assert report.short_labels(rows)[2] == "launcher.nproc_per_node=4 generate.batch_size=1"
    # the table names what each job measured: not where it was logged, nor how the sweep was resumed
    assert "| shard=tp launcher.nproc_per_node=4 generate.batch_size=1 | FINISHED" in report.markdown(rows)
    assert "tracker.uri" not in report.markdown(rows) and "tracker.uri" in report.csv_text(rows)


def test_a_section_is_replaced_only_where_its_markers_are(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("a\n<!-- tp4:begin -->\nold\n<!-- tp4:end -->\nb\n<!-- gpu_table:begin -->\nkeep\n<!-- gpu_table:end -->\n")
    report.write_section(doc, "new", "tp4")
    assert doc.read_text() == ("a\n<!-- tp4:begin -->\nnew\n<!-- tp4:end -->\nb\n"
                               "<!-- gpu_table:begin -->\nkeep\n<!-- gpu_table:end -->\n")
    with pytest.raises(LookupError, match="no <!-- tp2:begin -->"):
        report.write_section(doc, "new", "tp2")


def test_report_on_unknown_experiment_says_so(tmp_path):
    proc = run_cli("report", "--experiment", "nope", "--uri", f"sqlite:///{tmp_path}/m.db", cwd=tmp_path, check=2)
    assert "no experiment named 'nope'" in proc.stdout


@pytest.mark.slow
def test_a_rerun_sweep_measures_again_unless_resume_is_asked(tmp_path):
    sweep = ("-m", *TINY, "generate.batch_size=1,2")
    run_cli(*sweep, cwd=tmp_path, check=0)
    again = run_cli(*sweep, cwd=tmp_path, check=0)  # the default: every point measured
    assert "already FINISHED" not in again.stdout
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == 4
    resumed = run_cli(*sweep, "pipeline.resume=true", cwd=tmp_path, check=0)
    assert resumed.stdout.count("already FINISHED") == 2 and "best: optipipe" in resumed.stdout
    assert "reused from run" in resumed.stdout.split("best:")[1].splitlines()[0]
    summary = sorted((tmp_path / "outputs").rglob("summary.md"), key=lambda p: p.stat().st_mtime)[-1].read_text()
    assert summary.count("(reused from ") == 2
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == 4  # no new job runs
    bad = run_cli("-m", *TINY, "generate.batch_size=2,3", "pipeline.resume_from=last", cwd=tmp_path, check=2)
    assert "pipeline.resume_from" in bad.stderr and "32 hex digits" in bad.stderr


def test_only_an_earlier_run_of_the_same_sweep_or_the_named_one_stands_in(tmp_path):
    """Which FINISHED job with the same config a resumed sweep may reuse: one of an earlier run of
    the same sweep (same signature), or of the sweep pipeline.resume_from names; never a single
    run, another sweep's job, an unfinished one, or one of the sweep now running."""
    from pipeline.config import TrackerSettings
    from pipeline.tracking import SWEEP_SIGNATURE, MlflowTracker

    tracker = MlflowTracker(TrackerSettings(uri=f"sqlite:///{tmp_path}/m.db"))
    client = tracker.client
    exp = client.create_experiment("optipipe")

    def parent(signature: str) -> str:
        return client.create_run(exp, tags={SWEEP_SIGNATURE: signature}).info.run_id

    def job(parent_id: str | None, status: str = "FINISHED", config: str = "c1") -> str:
        tags = {"optipipe.config_hash": config, **({"mlflow.parentRunId": parent_id} if parent_id else {})}
        run_id = client.create_run(exp, tags=tags).info.run_id
        client.set_terminated(run_id, status=status)
        return run_id

    now, same, other = parent("s1"), parent("s1"), parent("s2")
    job(None)  # a single run
    job(other)  # another sweep's
    job(now)  # this sweep's own
    job(same, status="FAILED")
    assert tracker.finished_run("c1", now) is None
    earlier = job(same)
    job(same, config="c2")
    assert tracker.finished_run("c1", now) == earlier
    named = job(other)
    assert tracker.finished_run("c1", now, from_sweep=other) == named
    assert tracker.finished_run("c1", now, from_sweep=same) == earlier


def test_a_job_identity_includes_its_environment(monkeypatch):
    from pipeline import environment
    from pipeline.cli import config_hash

    cfg = composed(*TINY)
    here = config_hash(cfg)
    assert config_hash(cfg) == here
    real = environment.fingerprint
    monkeypatch.setattr(environment, "fingerprint", lambda: {**real(), "gpus": [("NVIDIA H200", "9.0")]})
    assert config_hash(cfg) != here  # another card: not the same measurement


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    """nf4 breaks a strict enforced gate, none passes it: one FAILED job with its reason, a report,
    the best line naming the job that passed, and a non-zero exit for the sweep."""
    proc = run_cli("-m", *TINY, "quantize=nf4,none", "evaluate=gated", "evaluate.gate.min_top1_agreement=0.99",
                   "evaluate.gate.max_perplexity_increase_pct=100", f"load.cache_dir={tmp_path}/c",
                   cwd=tmp_path, check=1)
    assert "best: optipipe" in proc.stdout and "quantize=none" in proc.stdout.split("best:")[1]
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    jobs = {r.data.params["quantize._target_"].rsplit(".", 1)[1]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert jobs["BitsAndBytes"].info.status == "FAILED" and jobs["NoQuantize"].info.status == "FINISHED"
    assert "evaluate.gate.min_top1_agreement=0.99" in jobs["BitsAndBytes"].data.tags["optipipe.error"]


def test_optuna_search_runs_three_trials_and_records_infeasible_ones(tmp_path):
    proc = run_cli("-m", "experiment=optuna_search", "model=tiny_random", "hydra.sweeper.n_trials=3",
                   "generate.max_new_tokens=4", "generate.repeats=1", f"load.cache_dir={tmp_path}/c",
                   cwd=tmp_path, check=0)
    assert "Best value" in proc.stdout + proc.stderr
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == 3


def test_over_the_memory_budget_ends_right_after_load(tmp_path):
    run_cli(*TINY, "pipeline.memory_budget_gib=0.0001", cwd=tmp_path, check=1)
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert "infeasible" in runs[0].data.tags["optipipe.error"]
    assert "pipeline.memory_budget_gib=0.0001" in runs[0].data.tags["optipipe.error"]
    assert not any(k.startswith("generate/") for k in runs[0].data.metrics)  # ended before generating


def test_an_encoder_sweep_reports_encoder_columns():
    from types import SimpleNamespace as NS

    def run(run_id, metrics):
        return NS(info=NS(run_id=run_id, run_name=run_id, status="FINISHED"),
                  data=NS(metrics=metrics, tags={"optipipe.overrides": f"generate.batch_size={run_id}"}))

    encoder = [report.row_of(run(str(b), {"generate/tokens_per_s": 900.0 * b, "generate/sequences_per_s": 30.0 * b,
                                          "generate/batch_latency_ms_p50": 5.0, "generate/batch_latency_ms_p90": 6.0}))
               for b in (1, 2)]
    header = report.markdown(encoder).splitlines()[0]
    assert "sequences_per_s" in header and "batch_latency_ms_p90" in header
    assert "ttft" not in header and "itl" not in header and "e2e" not in header  # no decoder names for an encoder
    decoder = report.row_of(run("3", {"generate/decode_tokens_per_s": 50.0, "generate/ttft_ms_p50": 20.0}))
    assert "ttft_ms_p50" in report.markdown([decoder]).splitlines()[0]
