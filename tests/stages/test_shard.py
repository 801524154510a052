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


def test_tensor_parallel_over_one_process_holds_the_whole_model_on_its_device(tmp_path):
    """The 1-process job of a sweep over processes (experiment=multi_gpu_scaling): transformers ignores
    a TP plan over one rank and would leave the model on the CPU, where a GPU job's NCCL all-reduce
    then fails. The rank loads the whole model onto its device instead and reduces nothing."""
    import torch.distributed as dist

    from pipeline.contract import DistInfo
    from pipeline.runner import make_plan, open_context
    from stages.shard.tp_layers import RowParallelLinear

    def tp(processes: int):
        return resolve(composed("model=tiny_random", "shard=tensor_parallel", "launcher=torchrun",
                                f"launcher.nproc_per_node={processes}", "tracker=none"))

    # the parent (a dry run prints this plan) describes what the ranks will do
    assert make_plan(tp(1)).kwargs["device_map"] == {"": "cpu"}
    assert {k: make_plan(tp(2)).kwargs[k] for k in ("tp_plan", "tp_size")} == {"tp_plan": "auto", "tp_size": 2}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        resolved = tp(1)
        plan = make_plan(resolved)
        assert plan.kwargs["device_map"] == {"": plan.device} and "distributed_config" not in plan.kwargs
        ctx = open_context(resolved, plan, tmp_path, DistInfo(device=plan.device))
        result = resolved.stages["shard"].apply(ctx)
    finally:
        dist.destroy_process_group()
    assert result.tags["shard.collective"] == "none (one process)" and result.metrics["tp_size"] == 1
    assert not any(isinstance(m, RowParallelLinear) for m in ctx.model.modules())  # nothing taken over
