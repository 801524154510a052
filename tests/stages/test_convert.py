"""convert: attention kernels agree, pins are enforced and explained, compile really compiles."""

from __future__ import annotations

import pytest
import torch

from pipeline.contract import ConfigProblems, StageError
from pipeline.runner import make_plan, open_context
from pipeline.validate import resolve
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
