"""Bad input: every mistake is reported at once, names its key and fix, and loads nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from pipeline.contract import BaseStage, ConfigProblems, NoSettings, QuantizeTraits
from pipeline.validate import resolve
from tests.conftest import ROOT, TINY, composed, run_cli


def problems_of(*overrides: str) -> str:
    with pytest.raises(ConfigProblems) as info:
        resolve(composed(*overrides))
    return str(info.value)


def test_wrong_type_names_the_key_and_the_fix():
    text = problems_of("generate.batch_size=abc")
    assert "generate.batch_size" in text and "fix: generate.batch_size=<int>" in text


def test_all_problems_are_reported_at_once():
    text = problems_of("generate.batch_size=0", "generate.max_new_tokens=0", "load.dtype=float8")
    for key in ("generate.batch_size", "generate.max_new_tokens", "load.dtype"):
        assert key in text


@pytest.mark.parametrize("overrides,key,fix", [
    (("generate.top_p=1.5",), "generate.top_p", "generate.top_p=0.9"),
    (("generate.top_p=0",), "generate.top_p", "generate.top_p=0.9"),
    (("generate.top_k=-1",), "generate.top_k", "generate.top_k=50"),
    (("evaluate=quality", "evaluate.corpus.max_chars=0"), "evaluate.corpus.max_chars", "evaluate.corpus.max_chars="),
    (("+pipline.dry_run=true",), "pipline", "did you mean pipeline"),
    (("+genrate.batch_size=2",), "genrate", "did you mean generate"),
    (("+foo=1",), "foo", "the sections are model"),
])
def test_out_of_range_values_and_unknown_sections_are_refused(overrides, key, fix):
    text = problems_of("model=tiny_random", *overrides)
    assert f"{key}: " in text and fix in text


# one bad value each on the tiny model: (overrides, the key named, a piece of the fix)
BAD_VALUES = [
    (("generate.max_new_tokens=100000",), "generate.max_new_tokens", "generate.max_new_tokens=512"),
    (("generate.prompt_tokens=100000",), "generate.prompt_tokens", "generate.prompt_tokens=256"),
    (("generate.prompt_tokens=500", "generate.max_new_tokens=100"), "generate.max_new_tokens",
     "generate.max_new_tokens=12"),
    (("generate.prompt_tokens=0",), "generate.prompt_tokens", "generate.prompt_tokens=128"),
    (("generate.batch_size=0",), "generate.batch_size", "generate.batch_size=1"),
    (("generate.repeats=0",), "generate.repeats", "generate.repeats=1"),
    (("generate.warmup=-1",), "generate.warmup", "generate.warmup=1"),
    (("generate.stop_check_every=0",), "generate.stop_check_every", "generate.stop_check_every=1"),
    (("generate.chat_template=maybe",), "generate.chat_template", "auto|on|off"),
    (("generate.do_sample=true", "generate.temperature=0"), "generate.temperature", "generate.temperature=0.7"),
    (("generate.engine=turbo",), "generate.engine", "transformers, fast"),
    (("generate.engine=os.system",), "generate.engine", "pipeline.allow=[os]"),
    (("generate.engine=stages.generate.prompts.encode",), "generate.engine", "see stages.generate.engines.Engine"),
    (("generate=fast", "+generate.engine_options.speed=11"), "generate.engine_options.speed",
     "remove generate.engine_options.speed"),
    (("generate=fast", "generate.fast_compile_mode=ultra"), "generate.fast_compile_mode", "reduce-overhead"),
    (("generate.prompts=[]",), "generate.prompts", "built-in prompts"),
    (("generate=encode",), "generate", "model=minilm_l6"),
    (("load.dtype=float8",), "load.dtype", "bfloat16"),
    (("load.device=tpu",), "load.device", "load.device=auto|cpu|cuda|cuda:N"),
    (("load.num_threads=-2",), "load.num_threads", "load.num_threads=2"),
    (("convert.implementation=magic",), "convert.implementation", "sdpa"),
    (("convert.sdpa_backends=[warp]",), "convert.sdpa_backends", "flash,efficient,math,cudnn"),
    (("shard=tensor_parallel",), "launcher", "launcher=torchrun launcher.nproc_per_node=2"),
    (("shard=data_parallel",), "launcher", "launcher=torchrun launcher.nproc_per_node=2"),
    (("shard=tensor_parallel", "launcher=torchrun", "launcher.nproc_per_node=2", "shard.all_reduce=fastest"),
     "shard.all_reduce", "auto, symm_mem, process_group"),
    (("shard=tensor_parallel", "launcher=torchrun", "launcher.nproc_per_node=2", "shard.one_shot_max_kib=0"),
     "shard.one_shot_max_kib", "shard.one_shot_max_kib=1024"),
    (("shard=tensor_parallel", "launcher=torchrun", "launcher.nproc_per_node=2", "shard.fuse_norm_wait=sideways"),
     "shard.fuse_norm_wait", "shard.fuse_norm_wait=<one of in_turn, together>"),
    (("launcher=torchrun", "launcher.nproc_per_node=0"), "launcher.nproc_per_node", "launcher.nproc_per_node=1"),
    (("launcher=torchrun", "launcher.nnodes=2"), "launcher.rdzv_endpoint", ":29500"),
    (("launcher.kind=slurm",), "launcher.kind", "launcher=local|torchrun"),
    (("++launcher.split_devices=true",), "launcher.split_devices", "launcher=torchrun"),
    (("tracker.kind=wandb",), "tracker.kind", "tracker=mlflow or tracker=none"),
    (("pipeline.memory_budget_gib=-1",), "pipeline.memory_budget_gib", "pipeline.memory_budget_gib=null"),
    (("pipeline.resume_from=abc",), "pipeline.resume_from", "32 hex digits"),
    (("model.source=ftp",), "model.source", "embedded, random"),
    (("model.task=vision",), "model.task", "causal_lm|encoder"),
]


@pytest.mark.parametrize("overrides,key,fix", BAD_VALUES)
def test_each_bad_value_is_refused_with_its_key_and_a_fix_that_differs_from_it(overrides, key, fix):
    text = problems_of("model=tiny_random", "tracker=none", *overrides)
    assert f"{key}: " in text and fix in text
    fixes = [line.split("fix: ", 1)[1] for line in text.splitlines() if "fix: " in line]
    assert not set(overrides) & {f.split(" ")[0] for f in fixes}  # a fix never repeats the value set


def test_a_tracker_timeout_must_be_positive(tmp_path):
    text = problems_of("model=tiny_random", f"tracker.uri=sqlite:///{tmp_path}/m.db", "tracker.connect_timeout_s=-1")
    assert "tracker.connect_timeout_s: must be > 0" in text and "tracker.connect_timeout_s=5" in text


class UncompileableQuantizer(BaseStage):
    """A plugin quantizer that states its traits: the rules must follow them, not its name."""

    name = "quantize"
    Config = NoSettings
    traits = QuantizeTraits(quantizes=True, compileable=False, tp_shardable=False, kernel="my_kernel")


def test_rules_follow_a_plugin_quantizers_declared_traits():
    plugin = ("quantize._target_=tests.pipeline.test_validation.UncompileableQuantizer", "pipeline.allow=[tests]")
    text = problems_of("model=tiny_random", "tracker=none", *plugin, "generate=fast")
    assert "generate.fast_compile_mode: my_kernel kernels cannot be compiled" in text
    text = problems_of("model=tiny_random", "tracker=none", *plugin, "shard=tensor_parallel", "launcher=torchrun",
                       "launcher.nproc_per_node=2")
    assert "my_kernel layers cannot be sharded" in text


class LoadWithoutLoading(BaseStage):
    """A plugin ``load`` that is a stage but cannot load: the runner would fail on it after validation."""

    Config = NoSettings


class HalfAStage:
    """Has a Config and apply() only: no problems(), plan() or describe()."""

    Config = NoSettings

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def apply(self, ctx):
        return None


def test_a_plugin_stage_must_fill_the_whole_contract():
    allow = "pipeline.allow=[tests]"
    text = problems_of("load._target_=tests.pipeline.test_validation.LoadWithoutLoading", allow)
    assert ("load._target_: tests.pipeline.test_validation.LoadWithoutLoading is not a load stage: it lacks device, "
            "materialize, reference_plan, torch_dtype_name") in text and "pipeline.contract.Loader" in text
    text = problems_of("evaluate._target_=tests.pipeline.test_validation.HalfAStage", allow)
    assert "is not a stage: it lacks describe, plan, problems" in text and "subclass pipeline.contract.BaseStage" in text


def test_target_outside_the_allow_list_is_refused():
    text = problems_of("evaluate._target_=os.system")
    assert "outside the allowed modules" in text and "pipeline.allow" in text


def test_missing_local_directory(tmp_path):
    text = problems_of("model=hub", f"model.id={tmp_path}/nope")
    assert "does not exist" in text and "model.id" in text


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "holds no weight files" in problems_of("model=hub", f"model.id={tmp_path}")


def test_pickle_checkpoint_needs_opt_in(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    torch.save(load_file(tiny_dir / "model.safetensors"), tmp_path / "pytorch_model.bin")
    text = problems_of("model=hub", f"model.id={tmp_path}")
    assert "load.allow_pickle" in text and "fix: load.allow_pickle=true" in text
    resolve(composed("model=hub", f"model.id={tmp_path}", "load.allow_pickle=true"))  # opted in: fine


def test_remote_code_needs_trust(tmp_path, tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    assert "load.trust_remote_code=true" in problems_of("model=hub", f"model.id={tmp_path}")


def test_prompt_file_missing_and_empty(tmp_path):
    assert "does not exist" in problems_of(f"generate.prompt_file={tmp_path}/none.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "holds no prompts" in problems_of(f"generate.prompt_file={tmp_path}/empty.txt")


def test_cuda_device_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "no CUDA device" in problems_of("load.device=cuda")


@pytest.mark.slow
def test_unknown_hub_model_offline_is_a_clear_problem(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "cannot read config.json of hub model" in problems_of("model=hub", "model.id=no-org/no-model")


def test_unreachable_tracker_fails_fast():
    start = time.perf_counter()
    text = problems_of("tracker.uri=http://127.0.0.1:9", "tracker.connect_timeout_s=2")
    assert "unreachable" in text and "tracker=none" in text
    assert time.perf_counter() - start < 15


# ------------------------------------------------------------ the same through the real CLI

def test_cli_config_problem_exits_2_and_writes_nothing(tmp_path):
    store = tmp_path / "mlflow.db"
    proc = run_cli(*TINY, "generate.batch_size=0", f"tracker.uri=sqlite:///{store}", cwd=tmp_path, check=2)
    assert "generate.batch_size" in proc.stderr and "nothing was loaded" in proc.stderr
    assert not store.exists()
    assert not (tmp_path / "outputs").exists()  # not even the run folder Hydra made before our checks


def test_a_corrupt_store_is_refused_before_loading_and_left_as_it_is(tmp_path):
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"not a database " * 100)
    proc = run_cli(*TINY, f"tracker.uri=sqlite:///{store}", cwd=tmp_path, check=2)
    assert "tracker.uri" in proc.stderr and "not a usable SQLite store" in proc.stderr
    assert store.read_bytes() == b"not a database " * 100 and not (tmp_path / "outputs").exists()


def test_cli_unknown_key_and_unknown_option_exit_2(tmp_path):
    proc = run_cli("generate.batch_sz=4", cwd=tmp_path, check=2)
    assert "batch_sz" in proc.stderr
    proc = run_cli("quantize=int9", cwd=tmp_path, check=2)
    assert "quantize/int9" in proc.stderr and "Available options" in proc.stderr


def test_cli_dry_run_prints_the_plan_and_loads_nothing(tmp_path):
    proc = run_cli("quantize=none", "pipeline.dry_run=true", cwd=tmp_path, check=0)
    assert "from_pretrained kwargs" in proc.stdout and "attn_implementation" in proc.stdout
    assert "stages.generate" in proc.stdout
    assert not (tmp_path / "outputs").exists()  # no store, no run folder


def test_hydra_node_constructors_outside_the_allow_list_never_run(tmp_path):
    """hydra.callbacks (and launchers, sweepers, logging handlers) are built by Hydra before any job:
    a config file naming an arbitrary callable is refused first, even for a dry run."""
    victim = tmp_path / "victim"
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "evil.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    evil:\n      _target_: builtins.open\n"
        f"      _args_: ['{victim}', w]\n")
    for args in (["--config-dir", str(tmp_path / "conf"), "experiment=evil"],
                 ["+hydra.callbacks.evil._target_=builtins.open", f"+hydra.callbacks.evil._args_=[{victim},w]"]):
        options, overrides = (args[:2], args[2:]) if args[0] == "--config-dir" else ([], args)
        proc = run_cli(*options, *TINY, "tracker=none", "pipeline.dry_run=true", *overrides, cwd=tmp_path, check=2)
        assert "hydra.callbacks.evil._target_" in proc.stderr and "builtins.open" in proc.stderr
        assert not victim.exists()
    # our own callback and Hydra's launchers still run
    run_cli(*TINY, "tracker=none", "pipeline.dry_run=true", cwd=tmp_path, check=0)


@pytest.mark.parametrize("content,override,key,says", [
    (b"\xff\xfe not text", "generate.prompt_file={f}", "generate.prompt_file", "not UTF-8 text"),
    (b"a\xffb", "evaluate.corpus.file={f}", "evaluate.corpus.file", "not UTF-8 text"),
    (b"PK\x03\x04 a zip, not weights", "model.id={f}", "model.id", "is not a GGUF file"),
])
def test_unreadable_input_files_are_refused_before_loading(tmp_path, content, override, key, says):
    f = tmp_path / ("weights.gguf" if "GGUF" in says else "input.txt")
    f.write_bytes(content)
    extra = ("evaluate=quality",) if key.startswith("evaluate") else ("model=hub",) if key == "model.id" else ()
    text = problems_of("model=tiny_random", *extra, override.format(f=f))
    assert f"{key}: " in text and says in text


def test_run_and_sweep_folders_outside_outputs_need_an_opt_in(tmp_path, monkeypatch):
    """A config file (here an experiment in --config-dir) or an override cannot send a run's files
    outside ./outputs without pipeline.allow_outside_outputs=true (run_cli would add it: not used)."""
    from pipeline.hydra_guard import problems_before_hydra

    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "away.yaml").write_text(
        "# @package _global_\nhydra:\n  run:\n    dir: ${oc.env:HOME}/optipipe_runs\n")
    away = ("--config-dir", str(tmp_path / "conf"), "experiment=away", *TINY, "tracker=none")
    refused = subprocess.run([sys.executable, "-m", "pipeline", *away], cwd=tmp_path, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert refused.returncode == 2 and "hydra.run.dir" in refused.stderr
    assert "pipeline.allow_outside_outputs=true" in refused.stderr and not (tmp_path / "outputs").exists()
    monkeypatch.chdir(tmp_path)  # the same check, in process, for the other cases
    keys = lambda *argv: [p.key for p in problems_before_hydra(list(argv))]  # noqa: E731
    assert keys("-m", "generate.batch_size=1,2", "hydra.sweep.dir=../elsewhere") == ["hydra.sweep.dir"]
    assert keys("hydra.run.dir=/tmp/anywhere") == ["hydra.run.dir"]
    assert keys("hydra.run.dir=outputs/mine") == []
    assert keys(*away[:3], "pipeline.allow_outside_outputs=true") == []


def test_a_mistyped_key_gets_the_closest_real_key_not_hydras_append_advice(tmp_path):
    proc = run_cli(*TINY, "tracker=none", "generate.batchsize=4", "generat.max_new_tokens=2", cwd=tmp_path, check=2)
    assert "generate.batchsize: unknown key" in proc.stderr and "did you mean 'batch_size'" in proc.stderr
    assert "To append to your config" not in proc.stderr
    assert not (tmp_path / "outputs").exists()
    proc = run_cli(*TINY, "tracker=none", "generat.max_new_tokens=2", cwd=tmp_path, check=2)
    assert "did you mean 'generate'" in proc.stderr
