"""benchmarks/fp8_linear_bench.py's table, which int4_linear_bench.py prints too: per-token totals
over 32 layers and the head, and a shape that failed shown as such (the timing itself needs CUDA)."""

from __future__ import annotations

import subprocess
import sys

import torch

from benchmarks import fp8_linear_bench
from tests.conftest import ROOT


def test_per_token_total_counts_every_layer_and_a_failed_shape_shows(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a card")
    us = {"qkv": 10.0, "o": 5.0, "gate_up": 30.0, "down": 20.0, "lm_head": 200.0}
    results = [{"variant": "dense", "rows": 1, "shape": s, "us": t, "weight_gb_per_s": 1000.0} for s, t in us.items()]
    results += [{"variant": "int4", "rows": 1, "shape": s, "us": t / 2, "weight_gb_per_s": 500.0}
                for s, t in us.items() if s != "down"]
    results.append({"variant": "int4", "rows": 1, "shape": "down", "error": "RuntimeError: no kernel"})
    fp8_linear_bench.print_table(results)
    lines = capsys.readouterr().out.splitlines()
    dense = next(line for line in lines if line.startswith("| dense | 1 |"))
    assert dense.endswith(f"| {(32 * (10 + 5 + 30 + 20) + 200) / 1e3:.2f} |")  # 32 layers + the head, in ms
    int4 = next(line for line in lines if line.startswith("| int4 | 1 |"))
    assert "| failed |" in int4 and int4.endswith("| nan |")  # no total from a missing shape


def test_the_layer_benches_refuse_a_machine_without_cuda():
    if torch.cuda.is_available():
        return
    for script in ("fp8_linear_bench.py", "int4_linear_bench.py"):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr
