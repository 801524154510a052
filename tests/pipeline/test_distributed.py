"""launcher=torchrun with real torchrun, gloo and 2 processes: one tracked run, rank metrics,
data-parallel splits, tensor parallel on CPU, failing and hanging ranks, and every rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from pipeline.config import LauncherSettings
from pipeline.contract import ConfigProblems
from pipeline.distributed import aggregate
from pipeline.launch import job_devices
from pipeline.validate import resolve
from stages.shard.parallel import fits_one_gpu
from tests.conftest import (OUTSIDE_OUTPUTS, ROOT, TINY, composed, default_sigint, generate_in_process,
                            mlflow_runs, run_cli)

TORCHRUN = ("launcher=torchrun", "launcher.nproc_per_node=2")

RANK_PLUGIN = '''
import time
from dataclasses import dataclass

from pipeline.contract import BaseStage, StageError, StageResult

@dataclass
class RankTroubleConfig:
    rank: int = 1
    fail: bool = False
    hang_s: float = 0.0

class RankTrouble(BaseStage):
    """An evaluate stage that fails, or hangs, on one rank only."""
    name = "evaluate"
    Config = RankTroubleConfig

    def apply(self, ctx):
        if ctx.dist.rank == self.cfg.rank:
            if self.cfg.fail:
                raise StageError("evaluate", f"rank {ctx.dist.rank} gave up on purpose")
            time.sleep(self.cfg.hang_s)
        return StageResult(metrics={"ok": 1.0})
'''


@pytest.fixture(scope="module")
def rank_plugin(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rankplugin")
    (root / "rank_trouble.py").write_text(textwrap.dedent(RANK_PLUGIN))
    return {"PYTHONPATH": f"{ROOT}:{root}"}


def samples(folder: Path, pattern: str) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob(pattern)) for line in f.read_text().splitlines()]


def no_process_mentions(text: str) -> bool:
    return not any(text in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))


@pytest.mark.slow
def test_scaling_preset_data_parallel_two_ranks_one_run_per_job(tmp_path):
    """experiment=multi_gpu_scaling narrowed to what a CPU does: data parallel, 2 gloo ranks."""
    proc = run_cli("-m", "experiment=multi_gpu_scaling", *TINY, "load.dtype=float32", *TORCHRUN,
                   "shard=data_parallel", "generate.max_new_tokens=6", "generate.batch_size=1,2",
                   "generate.fast_compile_mode=null",  # the preset's engine, eager: placement is under test
                   cwd=tmp_path, check=0, timeout=600)
    assert proc.stdout.count("optipipe: torchrun ×2") == 2 and "best: optipipe" in proc.stdout
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    jobs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 3 and len(jobs) == 2  # the sweep's parent + one run per job, not per rank
    for run in jobs:
        m = run.data.metrics
        assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
        ranks = [m[f"rank{r}/generate/decode_tokens_per_s"] for r in (0, 1)]
        assert m["generate/decode_tokens_per_s"] == pytest.approx(sum(ranks))  # replicas add up
        assert m["generate/memory_peak_rss_gib"] == pytest.approx(
            max(m[f"rank{r}/generate/memory_peak_rss_gib"] for r in (0, 1)))
        assert m["shard/replicas"] == 2
    batch2 = next(Path(r.data.tags["optipipe.output_dir"]) for r in jobs if r.data.params["generate.batch_size"] == "2")
    rank0, rank1 = (samples(batch2, f"generate_samples_rank{r}.jsonl") for r in (0, 1))
    assert len(rank0) == len(rank1) == 2  # batch_size is per replica
    assert not {s["prompt"] for s in rank0} & {s["prompt"] for s in rank1}  # distinct prompts


def test_tensor_parallel_on_cpu_gives_the_single_process_text(tmp_path):
    common = (*TINY, "generate.max_new_tokens=8", "generate.benchmark=true", "generate.batch_size=2",
              "generate=fast", "generate.warmup=1")
    generate_in_process(tmp_path / "one", *common)
    # the prompt's forward compiled too (its all-reduces inside the graph), with no recompile when timed
    run_cli(*common, *TORCHRUN, "shard=tensor_parallel", "generate.profile=true", "generate.fast_compile_prefill=true",
            f"hydra.run.dir={tmp_path}/tp", cwd=tmp_path, check=0, timeout=600)
    # shard.runtime=transformers: its DTensor layers and collectives stay available as the baseline
    run_cli(*common, *TORCHRUN, "shard=tensor_parallel", "shard.runtime=transformers",
            f"hydra.run.dir={tmp_path}/tp_hf", cwd=tmp_path, check=0, timeout=600)
    one = [s["token_ids"] for s in samples(tmp_path / "one", "generate_samples.jsonl")]
    for folder in ("tp", "tp_hf"):
        assert [s["token_ids"] for s in samples(tmp_path / folder, "generate_samples_rank0.jsonl")] == one
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    hf_run = next(r for r in runs if r.data.tags.get("shard.runtime") == "transformers")
    assert hf_run.data.tags["shard.collective"] == "gloo (transformers)" and "shard.head" not in hf_run.data.tags
    tp_run = next(r for r in runs if r.data.tags.get("shard.runtime") == "optipipe")
    assert (tp_run.data.params["generate.fast_compile_prefill"], tp_run.data.tags["generate.prefill"]) == (
        "True", "compiled (no CUDA graph)")
    assert tp_run.data.metrics["generate/recompiles_timed"] == 0
    assert tp_run.data.metrics["shard/sharded_parameters"] > 0 and tp_run.data.tags["world_size"] == "2"
    # our local layers ran (not transformers' DTensor ones), through gloo: no peer memory on a CPU
    tags = tp_run.data.tags
    assert (tags["shard.runtime"], tags["shard.collective"], tags["shard.head"]) == ("optipipe", "gloo", "vocab_parallel")
    assert "not CUDA" in tags["shard.collective_why"]
    # greedy through the split head (no logits gathered), q/k/v and gate/up of each rank's slice joined by
    # default; DTensor weights (transformers' layers) are not plain tensors, so those stay apart
    assert (tags["generate.token_choice"], tags["generate.fused_projections"]) == (
        "vocab_parallel_argmax", "joined q_proj+k_proj+v_proj, gate_proj+up_proj")
    assert hf_run.data.tags["generate.fused_projections"] == "off"
    # the ranks tune the decode step together (stages/shard/agreed_tuning.py)
    assert (tags["shard.kernel_tuning"], tags["generate.kernel_tuning"]) == (
        "agreed_over_ranks", "coordinate_descent_agreed_over_ranks")
    # all-reduce + add + RMSNorm became one op in the compiled step; without peer memory it runs unfused
    assert (tags["generate.all_reduce_norm"], hf_run.data.tags["generate.all_reduce_norm"]) == ("unfused", "off")
    # the unset levers saw our TP layers, and that neither split_kv nor PDL can run on a CPU
    assert tags["generate.levers"].startswith("decode attention sdpa, stream-order launch: tensor-parallel layers (")
    assert hf_run.data.tags["generate.levers"] == "decode attention sdpa, stream-order launch: one process"
    assert tp_run.data.metrics["shard/local_tp_layers"] > 0 and tp_run.data.metrics["shard/dtensor_parameters_left"] == 0
    # both ranks run the same tokens: throughput is one replica's, not the sum of two
    m = tp_run.data.metrics
    assert m["generate/decode_tokens_per_s"] == pytest.approx(
        (m["rank0/generate/decode_tokens_per_s"] + m["rank1/generate/decode_tokens_per_s"]) / 2)
    # generate.profile=true: every rank profiles its own share (collectives show up as communication)
    assert all(0 < m[f"rank{r}/generate/profile_busy_fraction"] <= 1 for r in (0, 1))
    assert m["rank1/generate/profile_communication_share"] > 0
    assert "| communication |" in (tmp_path / "tp" / "generate_profile_b2_rank1.md").read_text()


def test_int4_under_tensor_parallel_gives_the_single_process_int4_text(tmp_path):
    """int4 weights quantized rank by rank as they load sharded (groups that tile each rank's share of
    the inputs: tiny's 64-wide o_proj input is 32 a rank) give one process's int4 text; the quantize
    stage counts each rank's weights, not the DTensor that wraps the output head."""
    common = (*TINY, "generate.max_new_tokens=6", "generate.benchmark=true", "generate=fast",
              "generate.fast_compile_mode=null", "quantize=int4_torchao")
    generate_in_process(tmp_path / "one", *common, "quantize.group_size=32")
    run_cli(*common, *TORCHRUN, "shard=tensor_parallel", f"hydra.run.dir={tmp_path}/tp", cwd=tmp_path, check=0,
            timeout=600)
    one = [s["token_ids"] for s in samples(tmp_path / "one", "generate_samples.jsonl")]
    assert [s["token_ids"] for s in samples(tmp_path / "tp", "generate_samples_rank0.jsonl")] == one
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    tags = runs[0].data.tags
    assert (tags["quantize.group_size"], tags["quantize.format"]) == ("32", "{'IntxUnpackedToInt8Tensor': 14}")
    # the sliced int4 weights count as sharded (not only the DTensors: embedding and output head)
    assert runs[0].data.metrics["shard/sharded_parameters"] == 14 + 2


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["transformers", None])
def test_replicas_of_tensor_parallel_give_the_single_process_text(tmp_path, runtime):
    """4 gloo ranks = 2 replicas × TP2, on DTensor layers or ours (the default, runtime None): each
    replica's two ranks run the same tokens, and each replica's text equals one process generating for
    that replica's prompts."""
    # eager steps: compiling in 4 ranks on a 2-core CI machine costs a minute; the TP test above compiles
    common = (*TINY, "generate.max_new_tokens=8", "generate.benchmark=true", "generate.batch_size=2",
              "generate=fast", "generate.fast_compile_mode=null")
    run_cli(*common, "launcher=torchrun", "launcher.nproc_per_node=4", "shard=data_parallel", "shard.tp_size=2",
            *([f"shard.runtime={runtime}"] if runtime else []), f"hydra.run.dir={tmp_path}/dptp", cwd=tmp_path,
            check=0, timeout=600)
    ranks = [samples(tmp_path / "dptp", f"generate_samples_rank{r}.jsonl") for r in range(4)]
    assert ranks[0] == ranks[1] and ranks[2] == ranks[3]
    assert not {s["prompt"] for s in ranks[0]} & {s["prompt"] for s in ranks[2]}
    for replica, rows in enumerate((ranks[0], ranks[2])):
        prompts = tmp_path / f"replica{replica}.txt"
        prompts.write_text("\n".join(s["prompt"] for s in rows) + "\n")
        one = generate_in_process(tmp_path / f"one{replica}", *common, f"generate.prompt_file={prompts}")
        assert samples(one, "generate_samples.jsonl") == rows
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    m, tags = runs[0].data.metrics, runs[0].data.tags
    assert m["shard/replicas"] == 2 and m["shard/tp_size"] == 2
    if runtime == "transformers":
        assert m["shard/sharded_parameters"] > 0 and tags["shard.collective"] == "gloo (DTensor)"
    else:  # our layers over each replica's own group, its slice of the head, greedy through it
        assert m["shard/local_tp_layers"] > 0 and m["shard/dtensor_parameters_left"] == 0
        assert (tags["shard.runtime"], tags["shard.collective"], tags["shard.head"], tags["generate.token_choice"]) == (
            "optipipe", "gloo", "vocab_parallel", "vocab_parallel_argmax")
    # two replicas, each counted once: the sum over ranks halved
    assert m["generate/decode_tokens_per_s"] == pytest.approx(
        sum(m[f"rank{r}/generate/decode_tokens_per_s"] for r in range(4)) / 2)


def test_a_failing_rank_fails_the_run_with_its_message(tmp_path, rank_plugin):
    start = time.time()
    proc = run_cli(*TINY, *TORCHRUN, "shard=data_parallel", "evaluate._target_=rank_trouble.RankTrouble",
                   "+evaluate.fail=true", "pipeline.allow=[rank_trouble]", f"hydra.run.dir={tmp_path}/run",
                   cwd=tmp_path, env=rank_plugin, check=1, timeout=300)
    assert "rank1: [evaluate] rank 1 gave up on purpose" in proc.stdout + proc.stderr
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "rank 1 gave up on purpose" in runs[0].data.tags["optipipe.error"]
    assert time.time() - start < 120 and no_process_mentions(f"{tmp_path}/run")


@pytest.mark.slow
def test_a_hanging_rank_ends_the_group_within_the_collective_timeout(tmp_path, rank_plugin):
    start = time.time()
    run_cli(*TINY, *TORCHRUN, "shard=data_parallel", "evaluate._target_=rank_trouble.RankTrouble",
            "+evaluate.hang_s=600", "launcher.collective_timeout_s=5", "pipeline.allow=[rank_trouble]",
            f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=rank_plugin, check=1, timeout=300)
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert runs[0].info.status == "FAILED" and "rank0" in runs[0].data.tags["optipipe.error"]
    assert time.time() - start < 150 and no_process_mentions(f"{tmp_path}/run")


@pytest.mark.slow
def test_launcher_max_seconds_stops_the_whole_group(tmp_path, rank_plugin):
    run_cli(*TINY, *TORCHRUN, "shard=data_parallel", "evaluate._target_=rank_trouble.RankTrouble",
            "+evaluate.hang_s=600", "+evaluate.rank=0", "launcher.max_seconds=20",
            "pipeline.allow=[rank_trouble]", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=rank_plugin,
            check=1, timeout=300)
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert "launcher.max_seconds=20" in runs[0].data.tags["optipipe.error"]
    assert no_process_mentions(f"{tmp_path}/run")


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_and_marks_the_run_killed(tmp_path, rank_plugin):
    import os
    import signal
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *TINY, *TORCHRUN, "shard=data_parallel",
                             "evaluate._target_=rank_trouble.RankTrouble", "+evaluate.hang_s=600",
                             "pipeline.allow=[rank_trouble]", f"hydra.run.dir={run_dir}", OUTSIDE_OUTPUTS],
                            cwd=tmp_path, env={**os.environ, **rank_plugin, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "generate_samples_rank1.jsonl").exists():
        time.sleep(0.5)
    time.sleep(2)  # rank 1 is now asleep in its evaluate stage, rank 0 waits for it
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 130
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert runs[0].info.status == "KILLED"
    assert no_process_mentions(str(run_dir))


@pytest.mark.slow
def test_a_killed_parent_takes_its_torchrun_group_with_it(tmp_path, rank_plugin):
    """SIGKILL on the process that launched and tracks the group: torchrun and every rank stop
    within seconds (parent-death signal), instead of sleeping on for ever."""
    import os
    import subprocess
    import sys

    import psutil

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *TINY, *TORCHRUN, "shard=data_parallel",
                             "evaluate._target_=rank_trouble.RankTrouble", "+evaluate.hang_s=600",
                             "pipeline.allow=[rank_trouble]", f"hydra.run.dir={run_dir}", OUTSIDE_OUTPUTS],
                            cwd=tmp_path, env={**os.environ, **rank_plugin, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "generate_samples_rank1.jsonl").exists():
        time.sleep(0.5)
    time.sleep(2)  # rank 1 asleep in its evaluate stage, rank 0 waiting for it
    group = psutil.Process(proc.pid).children(recursive=True)
    assert len(group) >= 3  # torchrun and its two ranks
    proc.kill()
    proc.wait(timeout=10)
    _, alive = psutil.wait_procs(group, timeout=30)
    assert not alive, [p.cmdline()[:4] for p in alive]


def problems_of(*overrides: str) -> dict[str, str]:
    with pytest.raises(ConfigProblems) as info:
        resolve(composed("model=tiny_random", "tracker=none", *overrides))
    found: dict[str, str] = {}
    for p in info.value.problems:
        found[p.key] = found.get(p.key, "") + f"{p.message} | {p.fix} || "
    return found


def test_ranks_get_the_validated_config_and_do_not_compose_or_check_rules_again(tmp_path, monkeypatch):
    """The parent hands its validated configuration over in the environment: torchrun's command line
    carries no override (no secret in a process list), a rank types the stages from it without
    checking rules again, and pipeline.worker refuses to run outside a group optipipe started."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from pipeline.contract import CONFIG_ENV, handed_over
    from pipeline.launch import torchrun_command
    from pipeline.validate import build

    cfg = composed("model=tiny_random", "tracker=none", *TORCHRUN, "shard=tensor_parallel",
                   "generate.batch_size=3")
    cmd = torchrun_command(LauncherSettings(kind="torchrun", nproc_per_node=2), tmp_path / "run")
    assert cmd[-3:] == ["-m", "pipeline.worker", str(tmp_path / "run")] and not any("=" in a and "--" not in a for a in cmd[3:])
    rank_cfg = OmegaConf.create(json.loads(handed_over(cfg)))
    assert OmegaConf.to_container(rank_cfg) == OmegaConf.to_container(cfg, resolve=True)
    assert build(rank_cfg).stages["generate"].cfg.batch_size == 3
    broken = composed("model=tiny_random", "tracker=none", "shard=tensor_parallel")  # a rule refuses it (one process)
    with pytest.raises(ConfigProblems):
        resolve(broken)
    assert build(broken).stages["shard"].cfg.tp_size is None  # typed; rules are the parent's job
    huge = composed("model=tiny_random", "tracker=none", *TORCHRUN, "shard=data_parallel")
    huge.generate.prompts = ["a prompt of a hundred characters " * 3] * 1200  # ~120 KB: over what an environment takes
    with pytest.raises(ConfigProblems, match="generate.prompt_file"):
        resolve(huge)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    proc = subprocess.run([sys.executable, "-m", "pipeline.worker", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "start the job with optipipe" in proc.stderr


def test_multi_process_rules():
    assert "launcher=torchrun" in problems_of("shard=tensor_parallel")["launcher"]
    assert "launcher=torchrun" in problems_of("shard=data_parallel")["launcher"]
    # tiny-llama: 4 attention heads, 2 KV heads → TP over 4 does not divide the KV heads
    assert "size of 2" in problems_of("shard=tensor_parallel", "launcher=torchrun",
                                      "launcher.nproc_per_node=4")["shard.tp_size"]
    assert "shard=data_parallel shard.tp_size=2" in problems_of(
        "shard=tensor_parallel", "shard.tp_size=2", "launcher=torchrun", "launcher.nproc_per_node=4")["shard.tp_size"]
    assert "bitsandbytes" in problems_of("shard=tensor_parallel", *TORCHRUN, "quantize=nf4")["quantize"]
    bad_tp = problems_of("shard=tensor_parallel", *TORCHRUN, "shard.all_reduce=symm_mem", "shard.runtime=dtensor",
                         "shard.one_shot_max_kib=0")
    assert "needs CUDA" in bad_tp["shard.all_reduce"] and "optipipe|transformers" in bad_tp["shard.runtime"]
    assert "shard.one_shot_max_kib=1024" in bad_tp["shard.one_shot_max_kib"]
    assert "replicas" in problems_of("shard=data_parallel", "shard.tp_size=2", "launcher=torchrun",
                                     "launcher.nproc_per_node=3")["shard.tp_size"]
    bad_replicas = problems_of("shard=data_parallel", "shard.tp_size=2", "launcher=torchrun", "launcher.nproc_per_node=4",
                               "shard.runtime=dtensor", "shard.one_shot_max_kib=0")  # replicas × TP: the same checks
    assert "optipipe|transformers" in bad_replicas["shard.runtime"] and "shard.one_shot_max_kib" in bad_replicas
    assert "shard=data_parallel" in problems_of("shard=single", *TORCHRUN)["shard"]
    assert "shard=data_parallel" in problems_of("shard=pipeline", *TORCHRUN)["shard"]
    assert "rendezvous" in problems_of("shard=data_parallel", *TORCHRUN, "launcher.nnodes=2")["launcher.rdzv_endpoint"]
    assert "unknown launcher" in problems_of("launcher.kind=mpi")["launcher.kind"]
    assert "no tensor-parallel plan" in problems_of("model=tiny_bert_random", "generate=encode",
                                                    "shard=tensor_parallel", *TORCHRUN)["shard"]
    assert "quantize=none" in problems_of("shard=data_parallel", "shard.tp_size=2", "launcher=torchrun",
                                          "launcher.nproc_per_node=4", "quantize=int8_torchao")["quantize"]
    resolve(composed("model=tiny_random", "tracker=none", "shard=data_parallel", "shard.tp_size=2",
                     "launcher=torchrun", "launcher.nproc_per_node=4"))  # 2 replicas × TP2: fine


def test_data_parallel_refuses_a_model_larger_than_one_gpu():
    problem = fits_one_gpu(param_bytes=16e9, gpu_bytes=int(12 * 2**30))
    assert problem is not None and "shard=tensor_parallel" in problem.fix
    assert fits_one_gpu(param_bytes=16e9, gpu_bytes=int(80 * 2**30)) is None
    assert fits_one_gpu(param_bytes=None, gpu_bytes=int(12 * 2**30)) is None  # unknown: not refused


def test_sweep_jobs_lease_disjoint_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIPIPE_GPU_LOCKS", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    pair = LauncherSettings(kind="torchrun", nproc_per_node=2, split_devices=True)
    single = LauncherSettings(kind="torchrun", nproc_per_node=1, split_devices=True)
    with job_devices(pair) as first, job_devices(pair) as second:
        assert (first, second) == ("0,1", "2,3")
    with job_devices(single) as one, job_devices(pair) as other:  # mixed sizes never share a GPU
        assert (one, other) == ("0", "2,3")
    with job_devices(pair) as again:  # both leases ended with their jobs
        assert again == "0,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0, 1,2 ,3")  # spelled with spaces: the same GPUs, the same locks
    with job_devices(pair) as spaced, job_devices(pair) as other_pair:
        assert (spaced, other_pair) == ("0,1", "2,3")
    with job_devices(LauncherSettings(kind="torchrun", devices=[5, 6])) as given:
        assert given == "5,6"
    with job_devices(LauncherSettings(kind="torchrun", nproc_per_node=2)) as inherited:
        assert inherited is None


def test_sigterm_while_a_job_waits_for_gpus_ends_its_run_killed(tmp_path):
    """A scheduler's cancel reaches a job still waiting for its GPUs: the run is KILLED (SIGTERM said),
    exit 143, and no torchrun group was started."""
    import signal

    env = {**os.environ, "OPTIPIPE_GPU_LOCKS": str(tmp_path / "locks"), "CUDA_VISIBLE_DEVICES": "0",
           "HF_HUB_OFFLINE": "1"}
    hold = ("import time\nfrom pipeline.gpu_lease import gpu_lease\n"
            "with gpu_lease(['0'], 1, holder='job A'):\n    print('held', flush=True)\n    time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    job = None
    try:
        assert holder.stdout.readline().strip() == "held"
        job = subprocess.Popen([sys.executable, "-m", "pipeline", *TINY, "launcher=torchrun", "shard=data_parallel",
                                "launcher.nproc_per_node=1", "launcher.split_devices=true"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in job.stdout:  # until it says it waits
            lines.append(line)
            if "waiting for 1 free GPU(s) of 0" in line:
                assert f"GPU 0: pid {holder.pid}: job A" in line
                break
        job.send_signal(signal.SIGTERM)
        rest = job.communicate(timeout=60)[0]
        assert job.returncode == 143 and "torchrun ×" not in "".join(lines) + rest
        _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
        assert [(r.info.status, r.data.tags["optipipe.error"]) for r in runs] == [("KILLED", "terminated (SIGTERM)")]
    finally:
        for p in (holder, job):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_ranks_combine_as_the_measuring_stage_declares():
    from pipeline.contract import MEAN, RANK0, REPLICA_SUM, WORST
    from stages.generate.stage import ACROSS_RANKS_OF_GENERATE

    assert aggregate(REPLICA_SUM, [10.0, 12.0], ranks_per_replica=1) == 22.0  # two replicas
    assert aggregate(REPLICA_SUM, [10.0, 12.0], ranks_per_replica=2) == 11.0  # one TP2 replica
    assert aggregate(WORST, [3.0, 5.0], 1) == 5.0
    assert aggregate(MEAN, [0.5, 0.7], 1) == pytest.approx(0.6)
    assert aggregate(RANK0, [32.0, 32.0], 2) == 32.0
    assert (ACROSS_RANKS_OF_GENERATE["decode_tokens_per_s"], ACROSS_RANKS_OF_GENERATE["itl_ms_p90"],
            ACROSS_RANKS_OF_GENERATE["mbu"]) == (REPLICA_SUM, WORST, MEAN)
    assert "batch_size" not in ACROSS_RANKS_OF_GENERATE  # a setting: alike on every rank


@pytest.mark.gpu
def test_tensor_parallel_over_one_gpu_process_runs_the_whole_model_on_the_gpu(tmp_path):
    """The one-process job of a scaling sweep: transformers ignores a TP plan of one rank, so without
    our placement the model stayed on the CPU and the NCCL all-reduce failed on its tensors."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    common = (*TINY, "generate.max_new_tokens=16", "generate.benchmark=true", "generate=fast", "load.dtype=float32")
    generate_in_process(tmp_path / "one", *common)
    run_cli(*common, "launcher=torchrun", "launcher.nproc_per_node=1", "shard=tensor_parallel",
            f"hydra.run.dir={tmp_path}/tp1", cwd=tmp_path, check=0, timeout=600)
    one = [s["output"] for s in samples(tmp_path / "one", "generate_samples.jsonl")]
    assert [s["output"] for s in samples(tmp_path / "tp1", "generate_samples.jsonl")] == one
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    tags = next(r for r in runs if r.data.tags.get("choice.shard") == "tensor_parallel").data.tags
    assert tags["shard.collective"] == "none (one process)" and tags["shard.devices"].startswith("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("ranks", [2, 4])
def test_tensor_parallel_over_gpus_gives_the_one_gpu_text(tmp_path, ranks):
    """On 2 (and 4) GPUs with peer access, TP as it runs by default: our layers with the one-shot
    symmetric-memory all-reduce (symm_mem: no silent fallback), the fused all-reduce + add + RMSNorm
    kernel polling every peer at once, our split decode attention and programmatic dependent launch
    (both chosen for TP layers: stages/generate/auto_levers.py), inside the CUDA graph, give the text
    of one GPU, which runs neither lever, at batch 1 and 4; the tags say each of them ran."""
    import torch

    if torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} GPUs")
    # grouped-query on every rank (so the split decode attention runs): 2 query heads over 1 key/value head
    heads = ("+model.config_overrides.num_attention_heads=8", "+model.config_overrides.num_key_value_heads=4") \
        if ranks > 2 else ()
    for batch in (1, 4):
        common = (*TINY, *heads, "generate.max_new_tokens=32", "generate.benchmark=true", "generate=fast",
                  "load.dtype=float32", f"generate.batch_size={batch}")
        generate_in_process(tmp_path / f"one{batch}", *common)  # the one-GPU reference, without a CLI start
        run_cli(*common, "launcher=torchrun", f"launcher.nproc_per_node={ranks}", "shard=tensor_parallel",
                "shard.all_reduce=symm_mem", f"hydra.run.dir={tmp_path}/tp{batch}", cwd=tmp_path, check=0,
                timeout=600)
        one = [s["output"] for s in samples(tmp_path / f"one{batch}", "generate_samples.jsonl")]
        assert [s["output"] for s in samples(tmp_path / f"tp{batch}", "generate_samples_rank0.jsonl")] == one
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    tags = [r.data.tags for r in runs if r.data.tags.get("choice.shard") == "tensor_parallel"]
    assert {t["shard.collective"] for t in tags} == {"symm_mem_one_shot"}
    # every all-reduce + residual add + RMSNorm of the decode step ran as the one pushing kernel
    assert {t["generate.all_reduce_norm"] for t in tags} == {"push_kernel_together"}
    # coordinate-descent tuning ran on every rank with agreed times and still gave the one-GPU text
    assert {t["generate.kernel_tuning"] for t in tags} == {"coordinate_descent_agreed_over_ranks"}
    assert {t["generate.decode_attention"] for t in tags} == {"optipipe_gqa_decode + split_kv kernel"}
    assert {t["generate.cuda_graphs"] for t in tags} == {"captured"}
    if torch.cuda.get_device_capability()[0] >= 9:  # every lever could run: nothing left off
        assert {t["generate.kernel_launch"] for t in tags} == {"programmatic_dependent"}
        assert {t["generate.levers"] for t in tags} == {
            "decode attention split_kv, programmatic dependent launch: tensor-parallel layers"}
    else:
        assert all(t["generate.kernel_launch"].startswith("stream_order") for t in tags)
