"""benchmarks/gpu_table.py's rendering: the one-GPU base, joined results, killed rows, sections."""

from __future__ import annotations

import importlib.util

import subprocess

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_table", ROOT / "benchmarks" / "gpu_table.py")
gpu_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_table)

HOST = {"device": "H200 + H200", "date": "2026-11-27", "versions": "torch x"}


def result(*rows: dict, **host: str) -> dict:
    return {**HOST, **host, "rows": list(rows)}


def line(text: str, name: str) -> list[str]:
    return next(row for row in text.splitlines() if row.startswith(f"| {name} ")).split(" | ")


def test_joined_results_take_the_first_one_gpu_row_as_base_and_mark_a_killed_job():
    first = result({"name": "one_gpu_b32", "tok_s": 100.0}, {"name": "tp4_b32", "tok_s": 150.0})
    second = result({"name": "dp4_b32", "tok_s": 400.0, "exit_code": -9, "exit_after_results_s": 3.5},
                    {"name": "one_gpu_b32", "tok_s": 50.0})
    text = gpu_table.table(gpu_table.merged([first, second]))
    assert line(text, "tp4_b32")[5] == "1.50" and line(text, "dp4_b32")[5] == "4.00"
    assert "killed at the time limit 3.5 s after its results" in line(text, "dp4_b32")[-1]
    assert line(text, "tp4_b32")[-1].strip(" |") == ""  # no exit time recorded: nothing claimed
    cut = gpu_table.table(result({"name": "tp4_b1", "exit_code": -9, "status": "RUNNING"}))
    assert "killed at the time limit before its results" in line(cut, "tp4_b1 (RUNNING)")[-1]


def test_results_of_other_hosts_are_not_joined():
    with pytest.raises(SystemExit, match="one host"):
        gpu_table.merged([result(), result(device="H100 + H100")])


def test_gptfast_runs_that_never_exit_are_ended_soon_after_their_result(tmp_path, monkeypatch):
    """gpt-fast's TP ranks may hang at exit after printing: the run is ended after a grace period (and
    its torchrun ranks with it), not at the 300 s limit, and its row is kept."""
    import time

    anchor = tmp_path / "anchor"
    anchor.mkdir()
    (anchor / "gptfast_anchor.py").write_text(
        "import os, time\nif os.environ.get('LOCAL_RANK', '0') == '0':\n"
        "    print({'impl': 'gpt-fast', 'decode_tok_s': 99.5}, flush=True)\ntime.sleep(600)\n")
    monkeypatch.setattr(gpu_table, "GPTFAST_EXIT_GRACE_S", 1.0)
    start = time.time()
    rows = [row for found in gpu_table.gptfast_rows(anchor, tmp_path) for row in found]
    assert [(r["name"], r["tok_s"]) for r in rows] == [("gptfast_tp1_b1", 99.5), ("gptfast_tp2_b1", 99.5)]
    assert time.time() - start < 90
    left = subprocess.run(["pgrep", "-f", str(anchor)], capture_output=True, text=True).stdout.split()
    assert left == []  # torchrun's ranks were ended too


def test_gptfast_rows_are_kept_as_each_run_ends(tmp_path, monkeypatch):
    """The one-GPU anchor's row is written before its TP2 run starts, so a call cut short during TP2
    keeps it (the TP2 run here prints nothing, as a killed run would)."""
    import json

    anchor = tmp_path / "anchor"
    anchor.mkdir()
    (anchor / "gptfast_anchor.py").write_text(
        "import os\nif 'LOCAL_RANK' not in os.environ:\n    print({'impl': 'gpt-fast', 'decode_tok_s': 160.5})\n")
    seen = []
    for found in gpu_table.gptfast_rows(anchor, tmp_path):
        seen.append(found)
        if len(seen) == 1:  # before the TP2 run: the caller has the one-GPU row in hand
            assert found == [{"name": "gptfast_tp1_b1", "tok_s": 160.5, "gpus": 1, "batch": 1}]
    assert seen[1] == [] and (tmp_path / "gptfast_tp2.log").exists()
    monkeypatch.setattr(gpu_table, "gptfast_rows", lambda folder, out, tp, devices: iter([[{"name": "gptfast_tp1_b1", "tok_s": 1.0}]]))
    gpu_table.run([], tmp_path, 10, anchor, [], 1)
    assert json.loads((tmp_path / "gpu_table.json").read_text())["rows"][0]["name"] == "gptfast_tp1_b1"


def test_a_row_variant_adds_its_overrides_and_a_one_gpu_variant_is_the_base():
    gpus, batch, overrides, what = gpu_table.row_spec("tp2_b32+joined")
    assert (gpus, batch) == (2, 32) and overrides[-1] == "generate.fast_fuse_projections=true"
    assert what.endswith("q/k/v and gate/up joined") and "generate.fast_fuse_projections=true" not in gpu_table.row_spec("tp2_b32")[2]
    assert not gpu_table.known_row("tp2_b32+nope") and not gpu_table.known_row("tp3_b32")
    assert gpu_table.row_spec("tp2_b1+joined+gather")[2][-2:] == ["generate.fast_fuse_projections=true",
                                                                   "shard.split_greedy=false"]
    text = gpu_table.table(result({"name": "one_gpu_b32+joined", "tok_s": 100.0}, {"name": "one_gpu_b32", "tok_s": 90.0},
                                  {"name": "tp2_b32+joined", "tok_s": 140.0}))
    assert line(text, "one_gpu_b32")[5] == "0.90" and line(text, "tp2_b32+joined")[5] == "1.40"
    anchors = gpu_table.table(result({"name": "gptfast_tp1_b1", "tok_s": 100.0, "gpus": 1},
                                     {"name": "gptfast_tp4_b1", "tok_s": 210.0, "gpus": 4}))
    assert "gpt-fast's own TP4 / its one GPU: 2.10× (210.0 / 100.0 tok/s" in anchors and "TP2 /" not in anchors


def test_the_all_reduce_column_says_whether_the_norm_ran_fused():
    assert gpu_table.collective({"shard.collective": "symm_mem_one_shot", "generate.all_reduce_norm": "push_kernel"}) == (
        "symm_mem_one_shot + norm (push_kernel)")
    assert gpu_table.collective({"shard.collective": "gloo", "generate.all_reduce_norm": "off"}) == "gloo"
    assert gpu_table.collective({}) == ""  # one GPU: no collective
    assert gpu_table.row_spec("tp2_b32+unfusednorm")[2][-1] == "shard.fuse_norm=false"


def test_a_row_reads_its_job_back_from_the_store_with_the_timed_recompiles(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'gpu_table.db'}")  # no global tracking state
    run = client.create_run(client.create_experiment("gpu-table"), run_name="one_gpu_b1+prefill")
    metrics = {"generate/decode_tokens_per_s": 202.2, "generate/ttft_ms_p50": 14.1, "generate/recompiles_timed": 1.0,
               "load/stage_seconds": 12.34, "generate/gpu_sm_clock_mhz_p50": 1755.0, "generate/gpu_slowdown_share": 0.25}
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    job_dir = tmp_path / "runs" / "one_gpu_b1__prefill"  # no "+" in file names: some transfer tools skip them
    job_dir.mkdir(parents=True)
    (job_dir / "generate_samples.jsonl").write_text('{"token_ids": [5, 6]}\n')
    (job_dir / "rank1" / "deep").mkdir(parents=True)
    (job_dir / "rank1" / "deep" / "generate_profile_b1_rank1.md").write_text("# rank 1\n")
    (job_dir / "generate_profile_b1_rank0.md").write_text("# rank 0\n")
    row = gpu_table.read_run({"name": "one_gpu_b1+prefill"}, tmp_path)
    assert (row["status"], row["tok_s"], row["ttft_ms"]) == ("FINISHED", 202.2, 14.1)
    assert row["outputs"] == [[5, 6]]
    assert row["profile"] == "profile_one_gpu_b1__prefill.md"  # every rank's report in one file at the top
    assert (tmp_path / row["profile"]).read_text() == "# rank 0\n\n# rank 1\n"
    assert row["recompiles_timed"] == 1.0 and row["seconds"] == {"load/stage_seconds": 12.3}
    assert gpu_table.read_run({"name": "tp2_b1"}, tmp_path) == {"name": "tp2_b1"}  # no such job: as it was
    # the card's clock beside the rate: a slowed card is told from a slow configuration
    assert line(gpu_table.table(result(row)), "one_gpu_b1+prefill")[8] == "1755 (slowed 25%)"
    assert line(gpu_table.table(result({"name": "one_gpu_b1", "tok_s": 1.0})), "one_gpu_b1")[8] == ""  # not read


@pytest.mark.parametrize("obeys", [True, False])
def test_a_job_past_its_time_limit_is_told_to_stop_before_it_is_killed(tmp_path, monkeypatch, obeys):
    """SIGTERM first: optipipe then marks its run KILLED (a SIGKILLed job leaves it RUNNING)."""
    import sys
    import time

    monkeypatch.setattr(gpu_table, "TERM_GRACE_S", 2.0)
    on_term = "mark.write_text('stopped')\n    sys.exit(1)" if obeys else "mark.write_text('ignored')"
    script = (f"import pathlib, signal, sys, time\nmark = pathlib.Path(sys.argv[1])\ndef on_term(*_):\n    {on_term}\n"
              f"signal.signal(signal.SIGTERM, on_term)\nmark.write_text('ready')\ntime.sleep(30)\n")
    mark = tmp_path / "mark"
    proc = subprocess.Popen([sys.executable, "-c", script, str(mark)])
    deadline = time.time() + 20
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert mark.exists(), "the stand-in job did not start"
    row = gpu_table.finish({"name": "tp4_b1", "proc": proc, "start": time.time(), "timeout": 0.5, "devices": [0]},
                           tmp_path)
    assert row["exit_code"] == -9 and proc.poll() is not None
    assert mark.read_text() == ("stopped" if obeys else "ignored")


def test_rows_run_on_the_gpus_named(tmp_path, monkeypatch):
    """--devices 2,3: rows start on those GPUs only (another command can hold 0 and 1)."""
    from types import SimpleNamespace

    started = []

    def fake_job(name, out, timeout, extra, devices, side_by_side):
        assert side_by_side  # rows beside each other are timed only while the others are quiet
        started.append((name, devices))
        return {"name": name, "proc": SimpleNamespace(poll=lambda: 0), "start": 0.0, "timeout": 1e9, "devices": devices}

    monkeypatch.setattr(gpu_table, "job", fake_job)
    monkeypatch.setattr(gpu_table, "need", lambda name, gpus: gpu_table.row_spec(name)[0])  # as on a GPU host
    monkeypatch.setattr(gpu_table, "finish", lambda j, out: j)
    monkeypatch.setattr(gpu_table, "read_run", lambda j, out: {"name": j["name"]})
    gpu_table.run(["one_gpu_b1", "one_gpu_b32", "tp2_b1"], tmp_path, 10, None, [], 2, devices=[2, 3])
    assert started == [("one_gpu_b1", [2]), ("one_gpu_b32", [3]), ("tp2_b1", [2, 3])]
