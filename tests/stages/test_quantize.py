"""quantize: each bitsandbytes option really quantizes (module classes and bytes), on CPU."""

from __future__ import annotations

import pytest
import torch

from pipeline.contract import ConfigProblems, StageError
from pipeline.runner import make_plan, open_context
from pipeline.validate import resolve
from tests.conftest import composed

EXPECTED = {"int8": "Linear8bitLt", "nf4": "Linear4bit", "fp4": "Linear4bit", "nf4_double": "Linear4bit"}


def quantized(tmp_path, *overrides):
    resolved = resolve(composed("tracker=none", *overrides))
    ctx = open_context(resolved, make_plan(resolved), tmp_path)
    return ctx, resolved.stages["quantize"].apply(ctx)


@pytest.mark.parametrize("option", sorted(EXPECTED))
def test_every_option_quantizes_a_tiny_model(tmp_path, option):
    four_bit = () if option == "int8" else ("quantize.compute_dtype=float32",)
    ctx, result = quantized(tmp_path, "model=tiny_random", f"quantize={option}", *four_bit)
    layers = ctx.model.model.layers
    assert type(layers[0].mlp.up_proj).__name__ == EXPECTED[option]
    assert type(layers[0].self_attn.q_proj).__name__ == EXPECTED[option]
    assert type(ctx.model.lm_head).__name__ == "Linear"  # transformers keeps the head dense
    assert result.metrics["quantized_layers"] == 2 * 7  # 2 layers × (q, k, v, o, gate, up, down)
    assert result.metrics["unquantized_linear_layers"] == 1
    assert result.metrics["weight_bytes"] < result.metrics["dense_weight_bytes"]
    assert result.tags["quantize.method"] == option


def test_double_quant_is_smaller_than_plain_nf4(tmp_path):
    overrides = ("model=tiny_random", "+model.config_overrides.hidden_size=256",
                 "+model.config_overrides.intermediate_size=512", "quantize.compute_dtype=float32")
    _, plain = quantized(tmp_path, *overrides, "quantize=nf4")
    _, double = quantized(tmp_path, *overrides, "quantize=nf4_double")
    assert double.metrics["weight_bytes"] < plain.metrics["weight_bytes"]


def test_quantizing_nothing_fails_the_run(tmp_path):
    with pytest.raises(StageError, match="no layer was quantized"):
        quantized(tmp_path, "model=tiny_random", "quantize=int8", "quantize.skip_modules=[model,lm_head]")


def test_compute_dtype_mismatch_is_a_warning_not_silence():
    resolved = resolve(composed("model=tiny_random", "quantize=nf4", "load.dtype=float32", "tracker=none"))
    assert any(w.key == "quantize.compute_dtype" for w in resolved.warnings)


def test_bad_quantization_values_are_reported_together():
    with pytest.raises(ConfigProblems) as info:
        resolve(composed("quantize=nf4", "quantize.bits=3", "quantize.quant_type=nf3",
                         "quantize.compute_dtype=float99"))
    text = str(info.value)
    assert "quantize.bits" in text and "quantize.compute_dtype" in text


@pytest.mark.slow
@pytest.mark.parametrize("option,max_gib", [("int8", 0.25), ("nf4", 0.2)])
def test_real_smollm2_quantizes_and_still_answers(tmp_path, option, max_gib):
    four_bit = () if option == "int8" else ("quantize.compute_dtype=float32",)
    ctx, result = quantized(tmp_path, f"quantize={option}", *four_bit)
    assert result.metrics["quantized_layers"] == 30 * 7
    assert result.metrics["weight_bytes"] / 2**30 < max_gib < result.metrics["dense_weight_bytes"] / 2**30
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = ctx.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    out = ctx.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in ctx.tokenizer.decode(out[0][ids["input_ids"].shape[1]:])


# int4 on CPU is the same group-wise grid stored unpacked in int8 (torchao has no CPU int4 matmul)
TORCHAO = {"int8_torchao": ("Int8Tensor", 1.6), "int4_torchao": ("IntxUnpackedToInt8Tensor", 1.5)}


@pytest.mark.parametrize("option", sorted(TORCHAO))
def test_torchao_options_quantize_and_compile_with_the_fast_engine(tmp_path, option):
    weight_class, min_compression = TORCHAO[option]
    overrides = ("model=tiny_random", "+model.config_overrides.hidden_size=256",
                 "+model.config_overrides.intermediate_size=512", "load.dtype=bfloat16",
                 f"quantize={option}", "generate=fast", "generate.max_new_tokens=6", "generate.warmup=1",
                 "generate.repeats=1")
    ctx, result = quantized(tmp_path, *overrides)
    assert type(ctx.model.model.layers[0].mlp.up_proj.weight).__name__ == weight_class
    assert result.metrics["quantized_layers"] == 2 * 7
    assert result.metrics["compression"] > min_compression  # the embedding and head stay bf16
    assert result.tags["quantize.activations"] == "none"
    if option == "int4_torchao":  # the tag says a CPU has no int4 kernel
        assert result.tags["quantize.int4_kernel"].startswith("cpu (a CPU has no int4 matmul")
    else:
        assert "quantize.int4_kernel" not in result.tags
    for name in ("convert", "shard"):
        resolve(composed("tracker=none", *overrides)).stages[name].apply(ctx)
    gen = resolve(composed("tracker=none", *overrides)).stages["generate"]
    metrics = gen.apply(ctx).metrics
    assert metrics["new_tokens"] == 6 and metrics["recompiles_timed"] == 0


def test_torchao_rules():
    with pytest.raises(ConfigProblems) as info:
        resolve(composed("model=tiny_random", "tracker=none", "quantize=int4_torchao",
                         "quantize.group_size=100"))
    assert "quantize.group_size" in {p.key for p in info.value.problems}
    with pytest.raises(ConfigProblems, match="int4, int8, fp8"):
        resolve(composed("model=tiny_random", "tracker=none", "quantize=int8_torchao", "quantize.weights=int3"))
    with pytest.raises(ConfigProblems) as info:  # int8 has no kernel that quantizes activations
        resolve(composed("model=tiny_random", "tracker=none", "quantize=int8_torchao", "quantize.activations=dynamic"))
    (problem,) = info.value.problems
    assert problem.key == "quantize.activations" and problem.fix.startswith("quantize.activations=none")
    with pytest.raises(ConfigProblems, match="takes activations dynamic, not 'static'"):
        resolve(composed("model=tiny_random", "tracker=none", "quantize=fp8", "quantize.activations=static"))
    with pytest.raises(ConfigProblems) as info:  # torchao's weight-only float8 is not offered: ours is
        resolve(composed("model=tiny_random", "tracker=none", "quantize=fp8", "quantize.activations=none"))
    assert "quantize=fp8_weight_only" in info.value.problems[0].fix


def test_int4_on_cuda_warns_that_batches_decode_slower_than_bf16():
    from pipeline.validate import build

    def warnings(batch: int, device: str) -> list[str]:
        resolved = build(composed("model=tiny_random", "tracker=none", "quantize=int4_torchao", "generate=fast",
                                  f"load.device={device}", "load.dtype=bfloat16", f"generate.batch_size={batch}"))
        return [p.message for p in resolved.stages["quantize"].problems(resolved) if p.severity == "warning"]

    assert warnings(1, "cuda") == [] and warnings(32, "cpu") == []  # one row; CPU has no tinygemm
    (message,) = warnings(32, "cuda")
    assert "0.31–0.44× at batch 32" in message and "batch 32 asked" in message


def test_int4_weights_of_another_kernel_than_named_fail_the_run(tmp_path, monkeypatch):
    from stages import quantize

    # as if this CPU's int4 were tinygemm's: torchao makes int8-stored weights here, not tinygemm's tiles
    monkeypatch.setitem(quantize.INT4_WEIGHT_CLASS, "cpu", "Int4TilePackedTo4dTensor")
    with pytest.raises(StageError, match="should have made every quantized weight a Int4TilePackedTo4dTensor"):
        quantized(tmp_path, "model=tiny_random", "+model.config_overrides.hidden_size=256",
                  "+model.config_overrides.intermediate_size=512", "quantize=int4_torchao")


def test_fp8_is_refused_on_a_cpu_and_on_gpus_without_fp8_tensor_cores():
    from stages import quantize

    with pytest.raises(ConfigProblems) as info:  # this machine: the CPU
        resolve(composed("model=tiny_random", "tracker=none", "quantize=fp8", "load.device=cpu"))
    (problem,) = info.value.problems
    assert problem.key == "quantize" and "runs on cpu" in problem.message and "quantize=fp8_weight_only" in problem.fix
    resolve(composed("model=tiny_random", "tracker=none", "quantize=fp8_weight_only", "load.device=cpu"))  # runs
    # on CUDA the capabilities come from nvidia-smi (the validating process must not initialise CUDA)
    assert quantize.fp8_problems("cuda:0", lambda: [9.0, 9.0]) == []  # H100/H200
    assert quantize.fp8_problems("cuda:0", lambda: [8.9]) == []  # L4, RTX 4090
    (a100,) = quantize.fp8_problems("cuda:0", lambda: [9.0, 8.0])  # one A100 among them: refused
    assert "8.0" in a100.message and "int4_torchao" in a100.fix
    assert quantize.fp8_problems("cuda", lambda: None) == []  # unknown: torchao's own check decides


def test_fp8_on_an_fp8_gpu_asks_for_bfloat16_and_torchao_row_wise_float8(monkeypatch):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    from pipeline.validate import build
    from stages import quantize

    monkeypatch.setattr(quantize.gpus, "compute_capabilities", lambda: [9.0])
    resolved = build(composed("model=tiny_random", "tracker=none", "quantize=fp8", "load.device=cuda",
                              "load.dtype=float16"))
    stage = resolved.stages["quantize"]
    assert [(p.key, p.fix) for p in stage.problems(resolved)] == [("load.dtype", "load.dtype=bfloat16")]
    resolved = build(composed("model=tiny_random", "tracker=none", "quantize=fp8", "load.device=cuda",
                              "load.dtype=bfloat16", "quantize.include_embeddings=true"))
    assert [p.key for p in resolved.stages["quantize"].problems(resolved)] == ["quantize.include_embeddings"]
    config = stage.torchao_config("cuda:0", 128)
    assert isinstance(config, Float8DynamicActivationFloat8WeightConfig)
    assert isinstance(config.granularity, PerRow) or all(isinstance(g, PerRow) for g in config.granularity)
    assert stage.describe() == "TorchAo(fp8, weights + dynamic activations)"


def test_float8_rows_warn_where_they_are_not_fast(monkeypatch):
    """No float8 matmul: any GPU, any dtype; fast in the compiled one-row decode step only."""
    from pipeline.validate import build
    from stages import quantize

    monkeypatch.setattr(quantize.gpus, "compute_capabilities", lambda: [8.0])  # an A100: no capability rule

    def warnings(*overrides: str) -> list[str]:
        resolved = build(composed("model=tiny_random", "tracker=none", "quantize=fp8_weight_only",
                                  "load.dtype=float16", *overrides))
        stage = resolved.stages["quantize"]
        assert stage.describe() == "Float8WeightOnly(float8 rows, weight-only)"
        return [p.message for p in stage.problems(resolved) if p.severity == "warning"]

    assert warnings("load.device=cuda", "generate=fast") == [] and warnings("load.device=cpu") == []
    (eager,) = warnings("load.device=cuda")  # transformers' generate: every matmul converts its weight
    assert "compiled decode step of generate=fast" in eager
    assert warnings("load.device=cuda", "generate=fast", "generate.fast_compile_mode=null") == [eager]
    (batch,) = warnings("load.device=cuda", "generate=fast", "generate.batch_size=32")
    assert "0.48× at batch 32" in batch and "batch 32 asked" in batch


def test_float8_rows_quantize_every_linear_and_join_in_the_fast_engine(tmp_path):
    overrides = ("model=tiny_random", "+model.config_overrides.hidden_size=256",
                 "+model.config_overrides.intermediate_size=512", "load.dtype=bfloat16", "quantize=fp8_weight_only",
                 "generate=fast", "generate.fast_compile_mode=default", "generate.max_new_tokens=6",
                 "generate.warmup=1", "generate.repeats=1")
    ctx, result = quantized(tmp_path, *overrides)
    layer = ctx.model.model.layers[0]
    assert type(layer.mlp.up_proj).__name__ == "Float8RowsLinear" and layer.mlp.up_proj.weight.dtype == torch.float8_e4m3fn
    assert result.metrics["quantized_layers"] == 2 * 7 + 1  # the untied head too
    assert result.metrics["unquantized_linear_layers"] == 0
    assert result.metrics["compression"] > 1.6  # one byte per weight, a float32 scale per row; embedding bf16
    assert (result.tags["quantize.method"], result.tags["quantize.activations"], result.tags["quantize.head"]) == (
        "float8_rows", "none", "float8")
    resolved = resolve(composed("tracker=none", *overrides))
    for name in ("convert", "shard"):
        resolved.stages[name].apply(ctx)
    generated = resolved.stages["generate"].apply(ctx)
    assert generated.metrics["new_tokens"] == 6 and generated.metrics["recompiles_timed"] == 0
    assert generated.tags["generate.fused_projections"] == "joined q_proj+k_proj+v_proj, gate_proj+up_proj"
    assert generated.tags["generate.realize_opcount"] == "4"


def test_int4_groups_tile_each_tensor_parallel_ranks_share_of_the_inputs():
    """Tensor parallel shards the weights inside from_pretrained, and torchao quantizes each rank's
    slice: a row-parallel layer's input is 1/tp of the model's, so the int4 group must tile that too
    (the tiny model's 64-wide hidden size takes 64, each of two ranks' 32 only 32)."""
    from pipeline.runner import make_plan

    tp2 = ("model=tiny_random", "tracker=none", "quantize=int4_torchao", "shard=tensor_parallel", "launcher=torchrun",
           "launcher.nproc_per_node=2")
    resolved = resolve(composed(*tp2))
    plan = make_plan(resolved)
    assert plan.weight_split == 2 and resolved.stages["quantize"].chosen_group == 32
    one = resolve(composed("model=tiny_random", "tracker=none", "quantize=int4_torchao"))
    assert make_plan(one).weight_split == 1 and one.stages["quantize"].chosen_group == 64
    with pytest.raises(ConfigProblems) as e:  # a group that tiles the whole inputs but not a rank's share
        resolve(composed(*tp2, "quantize.group_size=64"))
    problem = next(p for p in e.value.problems if p.key == "quantize.group_size")
    assert "2 tensor-parallel ranks" in problem.message and problem.fix == "quantize.group_size=32"


@pytest.mark.slow
def test_torchao_int4_smollm2_still_answers(tmp_path):
    with pytest.raises(ConfigProblems, match="quantize.group_size=64"):  # 576 = 9 × 64
        resolve(composed("tracker=none", "quantize=int4_torchao", "quantize.group_size=128"))
    ctx, result = quantized(tmp_path, "quantize=int4_torchao", "load.dtype=bfloat16")  # auto: 64
    assert result.tags["quantize.group_size"] == "64"
    assert result.metrics["quantized_layers"] == 30 * 7
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = ctx.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    out = ctx.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in ctx.tokenizer.decode(out[0][ids["input_ids"].shape[1]:])
