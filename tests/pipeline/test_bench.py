"""optipipe bench: baselines and configurations side by side, logged so `optipipe report` reads it."""

from __future__ import annotations

import json

import pytest

from pipeline.bench import table, with_ratios
from tests.conftest import mlflow_runs, run_cli


def test_bench_runs_baselines_and_configs_on_a_tiny_model(tmp_path):
    run_cli("bench", "--model", "tiny_random", "--batches", "1,2", "--prompt", "8", "--new", "6",
                   "--repeats", "2", "--warmup", "1", "--configs", "convert=sdpa", "generate=fast", "--profile",
                   "--out", str(tmp_path / "b"), cwd=tmp_path, check=0, timeout=600)
    (folder,) = (tmp_path / "b").iterdir()  # one new folder per invocation
    rows = json.loads((folder / "bench.json").read_text())["rows"]
    assert [(r["config"], r["batch"]) for r in rows] == [
        (c, b) for c in ("plain", "hf_static_compile", "convert=sdpa", "generate=fast") for b in (1, 2)]
    for r in rows:
        assert r["decode_tokens_per_s"] > 0 and r["ttft_ms_p50"] > 0 and r["itl_ms_p90"] > 0
    assert all(r["x_plain"] == 1.0 for r in rows if r["config"] == "plain")
    assert {r["compiled"] for r in rows if r["config"] == "generate=fast"} == {"True"}
    # each row says what it ran with: the stages' and the engine's tags (also on its MLflow run)
    fast = next(r for r in rows if r["config"] == "generate=fast")
    assert fast["tags"]["generate.decode_attention"] == "optipipe_gqa_decode"
    assert fast["tags"]["generate.realize_opcount"] and "quantize.method" in fast["tags"]
    bench_md = (folder / "bench.md").read_text()
    assert "| generate=fast | 2 |" in bench_md and "command: `optipipe bench --model tiny_random" in bench_md
    assert "card: CPU" in bench_md and "versions: " in bench_md
    # --profile: where each row's time went
    for r in rows:
        shares = {k: v for k, v in r.items() if k.startswith("profile_") and k.endswith("_share")}
        assert sum(shares.values()) == pytest.approx(1.0) and shares["profile_matmul_share"] > 0
        assert 0 < r["profile_busy_fraction"] <= 1
    report = (folder / "profile_generate_fast_b2.md").read_text()
    assert "| matmul |" in report and "busy fraction" in report and report.startswith("# generate=fast, batch 2")
    assert "per generated token" in report and all(r["profile_matmul_ms_per_step"] > 0 for r in rows)
    # one parent, one child per row; `optipipe report --parent` reads the bench back like a sweep
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    parent = [r for r in runs if r.data.tags.get("optipipe.bench") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parent) == 1 and len(children) == 8
    assert {c.data.metrics["generate/decode_tokens_per_s"] for c in children} == \
        {r["decode_tokens_per_s"] for r in rows}
    assert {c.data.tags.get("generate.decode_attention") for c in children} == {None, "optipipe_gqa_decode"}
    report = run_cli("report", "--parent", parent[0].info.run_id, "--out", str(tmp_path / "r"),
                     cwd=tmp_path, check=0)
    assert "generate=fast batch=2" in report.stdout


def test_bench_refuses_a_bad_configuration_before_loading(tmp_path):
    proc = run_cli("bench", "--model", "tiny_random", "--configs", "generate=fast convert=compile",
                   "--no-track", "--out", str(tmp_path / "b"), cwd=tmp_path, check=2)
    assert "generate=fast brings its own static cache" in proc.stdout + proc.stderr
    assert not (tmp_path / "b").exists()  # refused before any folder was made


def test_ratios_are_per_batch_size():
    rows = with_ratios([{"config": "plain", "batch": 1, "decode_tokens_per_s": 50.0},
                        {"config": "plain", "batch": 8, "decode_tokens_per_s": 200.0},
                        {"config": "x", "batch": 1, "decode_tokens_per_s": 125.0},
                        {"config": "x", "batch": 8, "decode_tokens_per_s": 300.0}])
    assert [r["x_plain"] for r in rows] == pytest.approx([1.0, 1.0, 2.5, 1.5])
    for r in rows:
        r.update(compiled="False", weight_bytes=2**30)
    assert "| x | 8 | False | 300.0 | 1.50 |" in table(rows)  # no repeats' spread known: no ±


def test_a_ratio_carries_the_repeats_spread_and_a_ratio_within_it_is_no_win():
    rows = with_ratios([{"config": "plain", "batch": 1, "decode_tokens_per_s": 100.0, "decode_tokens_per_s_spread_pct": 4.0},
                        {"config": "fast", "batch": 1, "decode_tokens_per_s": 250.0, "decode_tokens_per_s_spread_pct": 6.0},
                        {"config": "noisy", "batch": 1, "decode_tokens_per_s": 110.0, "decode_tokens_per_s_spread_pct": 20.0}])
    for r in rows:
        r.update(compiled="True", weight_bytes=2**30)
    text = table(rows)
    assert "| plain | 1 | True | 100.0 | 1.00 |" in text
    assert "| fast | 1 | True | 250.0 | 2.50 ± 0.12 |" in text  # 2.5 × (6 + 4) / 200
    # 1.10 ± 0.13 holds 1.0: printed, but not as a win
    assert "| noisy | 1 | True | 110.0 | 1.10 ± 0.13 (≈ plain: within the repeats' spread) |" in text
    assert "floor tok/s:" not in text  # no bandwidth measured (CPU): no floor claimed


def test_cuda_rows_show_their_bandwidth_floor():
    rows = with_ratios([{"config": "plain", "batch": 1, "decode_tokens_per_s": 150.0, "compiled": "False",
                         "weight_bytes": 2**30, "floor_tokens_per_s": 200.0, "mbu": 0.75, "bandwidth_gb_per_s": 3000.0}])
    text = table(rows)
    assert text.splitlines()[2].endswith("| 1.00 | 200.0 | 0.75 |")
    assert "measured copy bandwidth, 3000 GB/s" in text


def test_kernel_names_fall_into_categories():
    from pipeline.profile import category

    assert category("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "communication"
    assert category("_c10d_functional::wait_tensor") == "communication"  # a rank waiting on its peers
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert category("triton_poi_fused_add_mul_0") == "other"
    # inductor's M=1 matmuls (coordinate descent) are reductions named after the mm they came from
    assert category("triton_red_fused__unsafe_view_mm_mul_silu_t_view_9") == "matmul"
    assert category("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_13") == "other"
    # a kernel that feeds our all-reduce op is named after it, but does no communication
    assert category("triton_red_fused__unsafe_view_mm_mul_silu_t_tp_all_reduce_view_9") == "matmul"
    assert category("triton_poi_fused_add_tp_all_reduce_3") == "other"
    assert category("void (anonymous namespace)::one_shot_all_reduce_kernel<c10::BFloat16, 16, 2>") == "communication"
    # the fused all-reduce + add + RMSNorm kernel (stages/shard/all_reduce_norm.py) is mostly the exchange
    assert category("push_all_reduce_add_rms_norm") == "communication"
    assert category("triton_poi_fused__to_copy_bmm_cat_cos_index_copy_mm_mul_neg") == "other"  # pointwise: no matmul
    assert category("triton_poi_fused__to_copy_add_arange_bmm_cat_cos_index_copy_mul_neg_sin_slice") == "other"
    assert category("triton_tem_fused_mm_0") == category("aten::mm") == "matmul"  # max-autotune's templates


def fake_row(config: str, batch: int) -> dict:
    """A measured row as measure_entry appends it (numbers made up: these tests are about the bench's
    bookkeeping, not about measuring, which the tiny-model test above does)."""
    return {"config": config, "batch": batch, "compiled": "False", "weight_bytes": 2.0**30,
            "decode_tokens_per_s": 100.0 * batch, "ttft_ms_p50": 5.0, "itl_ms_p50": 10.0, "itl_ms_p90": 11.0,
            "tags": {}}


def bench_in_process(tmp_path, monkeypatch, measure, *more: str) -> tuple[int, dict, str, list]:
    """``optipipe bench`` in this process with ``measure`` standing in for measure_entry: (exit code,
    bench.json, bench.md, MLflow runs)."""
    import signal

    from pipeline import bench

    monkeypatch.setattr(bench, "measure_entry", measure)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)
    store = tmp_path / "mlflow.db"
    code = bench.main(["--model", "tiny_random", "--batches", "1,2", "--baselines", "", "--out", str(tmp_path / "b"),
                       "--tracker-uri", f"sqlite:///{store}", "--configs", "convert=sdpa", "generate=fast",
                       "convert=eager", *more])
    # the bench's SIGTERM and SIGALRM handlers do not outlive it
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGALRM)) == before
    (folder,) = (tmp_path / "b").iterdir()
    _, runs = mlflow_runs(store)
    return code, json.loads((folder / "bench.json").read_text()), (folder / "bench.md").read_text(), runs


def test_a_failing_configuration_costs_its_rows_only_and_says_why(tmp_path, monkeypatch):
    def measure(entry, args, rows):
        rows.append(fake_row(entry.label, 1))
        if entry.label == "generate=fast":  # batch 1 measured, then batch 2 fails
            raise RuntimeError("CUDA error: no kernel image is available\nsecond line")
        rows.append(fake_row(entry.label, 2))

    code, data, md, runs = bench_in_process(tmp_path, monkeypatch, measure)
    assert code == 1 and data["state"] == "complete"
    rows = {(r["config"], r["batch"]): r for r in data["rows"]}
    assert len(rows) == 6 and "error" not in rows["generate=fast", 1] and "error" not in rows["convert=eager", 2]
    assert rows["generate=fast", 2]["error"] == "failed: RuntimeError: CUDA error: no kernel image is available"
    assert "- generate=fast, batch 2: failed: RuntimeError: CUDA error" in md and "state: complete" in md
    assert "| generate=fast | 2 | n/a |" in md
    children = {r.data.tags["mlflow.runName"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert children["generate=fast b2"].info.status == "FAILED"
    assert "no kernel image" in children["generate=fast b2"].data.tags["optipipe.error"]
    assert {c.info.status for name, c in children.items() if name != "generate=fast b2"} == {"FINISHED"}
    (parent,) = [r for r in runs if r.data.tags.get("optipipe.bench") == "true"]
    assert parent.info.status == "FINISHED"


def test_a_stopped_bench_keeps_what_it_measured_and_ends_killed(tmp_path, monkeypatch):
    from pipeline import stopping

    def measure(entry, args, rows):
        rows.append(fake_row(entry.label, 1))
        if entry.label == "generate=fast":  # as SIGTERM arrives in its batch-2 run
            raise stopping.Terminated
        rows.append(fake_row(entry.label, 2))

    code, data, md, runs = bench_in_process(tmp_path, monkeypatch, measure)
    assert code == 143 and data["state"] == "terminated (SIGTERM)" and "state: terminated (SIGTERM)" in md
    rows = {(r["config"], r["batch"]): r.get("error") for r in data["rows"]}
    assert rows == {("convert=sdpa", 1): None, ("convert=sdpa", 2): None, ("generate=fast", 1): None,
                    ("generate=fast", 2): "stopped: terminated (SIGTERM)",
                    ("convert=eager", 1): "stopped: terminated (SIGTERM)",
                    ("convert=eager", 2): "stopped: terminated (SIGTERM)"}
    (parent,) = [r for r in runs if r.data.tags.get("optipipe.bench") == "true"]
    assert parent.info.status == "KILLED"
    statuses = sorted(r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert statuses == ["FINISHED"] * 3 + ["KILLED"] * 3


def test_a_configuration_past_its_time_limit_fails_and_the_bench_goes_on(tmp_path, monkeypatch):
    import time

    def measure(entry, args, rows):
        rows.append(fake_row(entry.label, 1))
        if entry.label == "generate=fast":  # hangs in its batch-2 run
            time.sleep(30)
        rows.append(fake_row(entry.label, 2))

    start = time.time()
    code, data, md, runs = bench_in_process(tmp_path, monkeypatch, measure, "--config-timeout", "1.5")
    assert time.time() - start < 20 and code == 1 and data["state"] == "complete"
    rows = {(r["config"], r["batch"]): r.get("error") for r in data["rows"]}
    assert rows.pop(("generate=fast", 2)) == "failed: ConfigTimeout: still running after --config-timeout 1.5 s"
    assert set(rows.values()) == {None}  # the rows before it and the configuration after it: measured
    assert "- generate=fast, batch 2: failed: ConfigTimeout" in md


def test_config_timeout_must_be_positive(tmp_path):
    proc = run_cli("bench", "--model", "tiny_random", "--config-timeout", "0", "--configs", "generate=fast",
                   "--no-track", "--out", str(tmp_path / "b"), cwd=tmp_path, check=2)
    assert "--config-timeout must be a positive number of seconds" in proc.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_sigterm_mid_bench_keeps_the_measured_configuration(tmp_path):
    """`timeout` or a scheduler's cancel, for real: the first configuration's rows survive."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "bench", "--model", "tiny_random", "--batches", "1",
                             "--prompt", "8", "--new", "6", "--repeats", "1", "--warmup", "1", "--baselines", "",
                             "--out", str(tmp_path / "b"), "--configs", "convert=sdpa", "generate=fast"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("b/*/bench.json")):  # written after each configuration
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    data = json.loads(next(tmp_path.glob("b/*/bench.json")).read_text())
    assert data["state"] == "terminated (SIGTERM)"
    first, second = data["rows"]
    assert first["config"] == "convert=sdpa" and first["decode_tokens_per_s"] > 0
    assert second == {"config": "generate=fast", "batch": 1, "error": "stopped: terminated (SIGTERM)",
                      "status": "KILLED"}
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED", "KILLED"]
