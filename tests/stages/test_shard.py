"""shard: single keeps one device; pipeline spreads layers over devices, CPU and disk."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.contract import ConfigProblems
from pipeline.validate import resolve
from tests.conftest import TINY, composed, mlflow_runs, run_cli


def test_pipeline_placement_offloads_to_disk_and_generates_the_same_text(tmp_path):
    outputs = {}
    for shard in ("single", "pipeline"):
        extra = ("shard.max_memory={cpu: 400KB}", f"shard.offload_folder={tmp_path}/off") if shard == "pipeline" else ()
        run_cli(*TINY, f"shard={shard}", *extra, "generate.max_new_tokens=8", "generate.benchmark=true",
                f"hydra.run.dir={tmp_path}/{shard}", f"tracker.uri=sqlite:///{tmp_path}/{shard}.db",
                cwd=tmp_path, check=0)
        outputs[shard] = [json.loads(x)["output"] for x in (tmp_path / shard / "generate_samples.jsonl").read_text().splitlines()]
    assert outputs["single"] == outputs["pipeline"]
    _, runs = mlflow_runs(tmp_path / "pipeline.db")
    assert "disk" in runs[0].data.tags["shard.devices"] and runs[0].data.metrics["shard/modules_disk"] >= 1


def test_fast_engine_refuses_a_model_split_by_accelerate(tmp_path):
    proc = run_cli(*TINY, "shard=pipeline", "shard.max_memory={cpu: 400KB}", f"shard.offload_folder={tmp_path}/off",
                   "generate=fast", "tracker=none", cwd=tmp_path, check=1)
    assert "cannot cross its device hooks" in proc.stdout + proc.stderr
    assert "shard.device_map=sequential" in proc.stdout + proc.stderr


def test_pipeline_placement_fills_the_first_device_first_by_default():
    from pipeline.runner import make_plan

    plan = make_plan(resolve(composed("model=tiny_random", "shard=pipeline", "tracker=none")))
    assert plan.kwargs["device_map"] == "sequential"
    plan = make_plan(resolve(composed("model=tiny_random", "shard=pipeline", "shard.device_map=auto", "tracker=none")))
    assert plan.kwargs["device_map"] == "auto"


def test_pipeline_placement_rules():
    with pytest.raises(ConfigProblems, match="shard.device_map"):
        resolve(composed("model=tiny_random", "shard=pipeline", "shard.device_map=everywhere"))
    if torch.cuda.device_count() > 1:
        return  # several GPUs: placement over them is meaningful, no warning
    resolved = resolve(composed("model=tiny_random", "shard=pipeline"))
    assert any(w.key == "shard" and "one device" in w.message for w in resolved.warnings)
