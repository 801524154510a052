"""convert: attention kernels agree, pins are enforced and explained, compile really compiles."""

from __future__ import annotations

import pytest
import torch

from pipeline.contract import ConfigProblems, StageError
from pipeline.runner import make_plan, open_context
from pipeline.validate import resolve
from stages.attention import AttentionKind
from tests.conftest import composed


def loaded(tmp_path, *overrides):
    resolved = resolve(composed("tracker=none", *overrides))
    return resolved, open_context(resolved, make_plan(resolved), tmp_path)


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model", ["tiny_random", pytest.param("smollm2_135m", marks=pytest.mark.slow)])
def test_sdpa_and_eager_give_the_same_logits(tmp_path, model):
    _, sdpa = loaded(tmp_path, f"model={model}", "convert=sdpa", "load.dtype=float32")
    _, eager = loaded(tmp_path, f"model={model}", "convert=eager", "load.dtype=float32")
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80]], device=sdpa.model.device)
    # float32: the kernels differ only by summation order (CUDA kernels may use TF32 internally)
    tol = 2e-3 if ids.is_cuda else 1e-4
    torch.testing.assert_close(logits(sdpa.model, ids), logits(eager.model, ids), atol=tol, rtol=tol)


def test_attention_implementation_is_read_back(tmp_path):
    resolved, ctx = loaded(tmp_path, "model=tiny_random", "convert=eager")
    result = resolved.stages["convert"].apply(ctx)
    assert result.tags["convert.attn_implementation"] == "eager"


CALLS: list[int] = []


def _counted_sdpa(module, query, *args, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    CALLS.append(query.shape[2])
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, *args, **kwargs)


def _register_counted() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("counted_sdpa", _counted_sdpa)
    AttentionMaskInterface.register("counted_sdpa", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


# a plugin attention: one AttentionKind (plus, for users, one YAML: implementation: <its path>)
COUNTED = AttentionKind("counted_sdpa", "SDPA that counts its calls", register=_register_counted, sdpa_kernels=True)


@pytest.mark.parametrize("implementation", ["tests.stages.test_convert.COUNTED", "optipipe_gqa_decode"])
def test_ours_and_a_plugin_attention_load_run_and_are_read_back(tmp_path, implementation):
    common = ("model=tiny_random", "load.dtype=float32", "generate.max_new_tokens=5", "generate.benchmark=true",
              "generate.warmup=0", "generate.repeats=1", "generate.batch_size=2")
    texts = {}
    for name, impl in (("sdpa", "sdpa"), ("other", implementation)):
        (tmp_path / name).mkdir()
        resolved, ctx = loaded(tmp_path / name, *common, f"convert.implementation={impl}", "pipeline.allow=[tests]")
        tags = resolved.stages["convert"].apply(ctx).tags
        resolved.stages["generate"].apply(ctx)
        texts[name] = (tmp_path / name / "generate_samples.jsonl").read_text()
    expected = {"optipipe_gqa_decode": "optipipe_gqa_decode"}.get(implementation, "counted_sdpa")
    assert tags["convert.attn_implementation"] == expected  # what the loaded model reports
    assert texts["other"] == texts["sdpa"]  # the same greedy tokens as plain SDPA
    assert tags["convert.sdpa_backend_observed"] != "none"  # it runs SDPA kernels, as its kind says
    if "COUNTED" in implementation:  # the list of the module the allow-list imported (pytest may import its own copy)
        calls = resolved.stages["convert"].kind().register.__globals__["CALLS"]
        assert calls and 1 in calls  # it ran, decode steps (one query token) included


def test_a_plugin_attention_outside_the_allow_list_or_of_the_wrong_type_is_refused():
    with pytest.raises(ConfigProblems, match="pipeline.allow"):
        resolve(composed("model=tiny_random", "convert.implementation=tests.stages.test_convert.COUNTED"))
    with pytest.raises(ConfigProblems, match="is not an AttentionKind"):
        resolve(composed("model=tiny_random", "convert.implementation=tests.stages.test_convert.logits",
                         "pipeline.allow=[tests]"))


def test_sdpa_pin_is_observed_in_the_trace(tmp_path):
    resolved, ctx = loaded(tmp_path, "model=tiny_random", "convert=sdpa_math")
    result = resolved.stages["convert"].apply(ctx)
    assert result.tags["convert.sdpa_backend_observed"] == "math"


def test_no_available_kernel_becomes_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the efficient kernel exists on CUDA")
    resolved, ctx = loaded(tmp_path, "model=tiny_random", "convert=sdpa", "convert.sdpa_backends=[efficient]")
    with pytest.raises(StageError) as info:
        resolved.stages["convert"].apply(ctx)
    assert "only on CUDA" in info.value.message and "convert.sdpa_backends" in info.value.hint


def test_static_cache_and_compile_match_eager_tokens_on_cpu(tmp_path):
    resolved, ctx = loaded(tmp_path, "model=tiny_random", "convert=compile", "convert.compile_mode=default",
                           "generate.benchmark=true", "generate.max_new_tokens=6", "generate.repeats=2",
                           "generate.prompt_tokens=8")
    resolved.stages["convert"].apply(ctx)
    assert ctx.generate_kwargs["cache_implementation"] == "static"
    result = resolved.stages["generate"].apply(ctx)
    assert result.tags["convert.compiled"] == "true"
    assert result.metrics["recompiles_timed"] == 0
    assert result.metrics["warmup_seconds"] > 0
    ids = torch.tensor([[t for t in range(1, 9)]])
    plain = ctx.model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, disable_compile=True)
    compiled = ctx.model.generate(ids, **ctx.generate_kwargs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(plain, compiled)


def test_bitsandbytes_with_compile_warns_then_fails_its_check(tmp_path):
    resolved, ctx = loaded(tmp_path, "model=tiny_random", "quantize=nf4", "quantize.compute_dtype=float32",
                           "convert=compile", "generate.max_new_tokens=2", "generate.repeats=1")
    assert any(w.key == "convert.compile" for w in resolved.warnings)
    resolved.stages["convert"].apply(ctx)
    with pytest.raises(StageError, match="not compileable"):
        resolved.stages["generate"].apply(ctx)


@pytest.mark.parametrize("overrides,key", [
    (("convert=eager", "convert.sdpa_backends=[math]"), "convert.sdpa_backends"),
    (("convert=sdpa", "convert.sdpa_backends=[warp]"), "convert.sdpa_backends"),
    (("convert=sdpa", "convert.compile=true"), "convert.compile"),
    (("convert=flash_attention_2",), "convert.implementation"),
])
def test_rules_before_loading(overrides, key):
    with pytest.raises(ConfigProblems) as info:
        resolve(composed("model=tiny_random", *overrides))
    assert key in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_pin_with_float32_on_cuda_is_refused():
    with pytest.raises(ConfigProblems, match="load.dtype=bfloat16"):
        resolve(composed("model=tiny_random", "convert=sdpa_flash", "load.dtype=float32"))
