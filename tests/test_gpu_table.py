"""benchmarks/gpu_table.py's rendering: the one-GPU base, joined results, killed rows, sections."""

from __future__ import annotations

import importlib.util

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


def test_results_of_other_hosts_are_not_joined():
    with pytest.raises(SystemExit, match="one host"):
        gpu_table.merged([result(), result(device="H100 + H100")])
