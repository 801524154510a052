"""The fast decode engine: token for token what transformers generate gives, greedy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.contract import ConfigProblems
from pipeline.runner import make_plan, open_context
from pipeline.validate import resolve
from stages.generate.engine import FastDecoder, trim_finished
from tests.conftest import composed


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa")


def left_padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(3, vocab, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :1] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


def plain(model, ids, mask, new, eos, min_new=0):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=min_new,
                          do_sample=False, pad_token_id=0, eos_token_id=eos, disable_compile=True)


@pytest.mark.parametrize("compile_mode,compile_prefill", [(None, False), ("reduce-overhead", False),
                                                         ("reduce-overhead", True)])
def test_greedy_equals_generate_with_padding_and_early_eos(tiny_model, compile_mode, compile_prefill):
    ids, mask = left_padded_batch(tiny_model.config.vocab_size)
    free_run = plain(tiny_model, ids, mask, 24, eos=[])
    # an EOS that row 0 emits at its 6th token: row 0 stops early and is padded, the others go on
    eos = [int(free_run[0, ids.shape[1] + 5])]
    from torch._dynamo.utils import counters

    engine = FastDecoder(tiny_model, compile_mode=compile_mode, stop_check_every=4, compile_prefill=compile_prefill)
    graphs = []
    for min_new in (0, 24):  # EOS honoured / EOS banned until the end (benchmark mode)
        expected = plain(tiny_model, ids, mask, 24, eos, min_new)
        got = engine.generate(ids, mask, 24, eos, pad_token_id=0, min_new_tokens=min_new)
        assert torch.equal(got, expected), f"min_new_tokens={min_new}\n{expected}\n{got}"
        graphs.append(counters["stats"]["unique_graphs"])
    assert engine._step is not None  # the step was built once and reused across calls
    assert graphs[1] == graphs[0]  # the second call (a benchmark's timed run) compiles nothing
    if compile_mode:  # inductor runs a CPU step without the CUDA graph its mode asks for: counted, and said
        assert engine.graph_skips >= 1 and engine.cuda_graphs().startswith("none (cpu")
    else:
        assert engine.graph_skips is None and engine.cuda_graphs() == "not asked (compile mode None)"
    if compile_prefill:  # a prompt of another length: the compiled prefill follows (dynamic shapes)
        short, short_mask = ids[:, 3:], mask[:, 3:]
        assert torch.equal(engine.generate(short, short_mask, 6, [], 0), plain(tiny_model, short, short_mask, 6, eos=[]))


def test_bucketed_prefill_gives_generates_tokens_and_compiles_once_per_padded_length(tiny_model):
    """fast_prefill_graph: prompts left-padded to a multiple of the bucket — the padding attends to
    nothing and moves no position, so the tokens are generate's — and prompts of two lengths in one
    bucket share one compiled prefill (one CUDA graph on a GPU; on a CPU the graph is declined)."""
    from torch._dynamo.utils import counters

    ids, mask = left_padded_batch(tiny_model.config.vocab_size)  # 10 tokens: padded to 16
    engine = FastDecoder(tiny_model, compile_mode="reduce-overhead", compile_prefill=True, prefill_bucket=8)
    assert engine.prefill() == "compiled, prompts left-padded to a multiple of 8 tokens (no CUDA graph on cpu)"
    got = engine.generate(ids, mask, 12, [], pad_token_id=0)
    assert torch.equal(got, plain(tiny_model, ids, mask, 12, eos=[]))  # the caller's prompt, unpadded, then generate's
    compiled = counters["stats"]["unique_graphs"]
    shorter, shorter_mask = ids[:, 1:], mask[:, 1:]  # 9 tokens: the same padded length
    assert torch.equal(engine.generate(shorter, shorter_mask, 12, [], 0), plain(tiny_model, shorter, shorter_mask, 12, eos=[]))
    assert counters["stats"]["unique_graphs"] == compiled  # nothing compiled for it
    assert engine.cache_shape == (3, 16 + 12) and engine.prefill_graph_skips >= 1  # CPU: no graph, counted


def test_pad_left_pads_to_the_next_multiple_and_masks_the_padding():
    from stages.generate.engine import pad_left

    ids, mask = torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 1]])
    padded, padded_mask = pad_left(ids, mask, 4, pad_token_id=9)
    assert padded.tolist() == [[9, 5, 6, 7]] and padded_mask.tolist() == [[0, 1, 1, 1]]
    assert pad_left(padded, padded_mask, 4, 9)[0] is padded  # already a multiple: untouched


def test_no_stop_check_waits_for_the_device_while_eos_is_banned(tiny_model, monkeypatch):
    """"Has every row finished?" is a device→host read that drains the GPU; while EOS is banned
    (min_new_tokens, a benchmark's whole run) no row can have finished, so it is never asked."""
    from stages.generate import engine as E

    due = [E.stop_check_due(*case, 16) for case in ((16, 256, 256), (256, 256, 256), (16, 0, 256), (15, 0, 256),
                                                     (256, 0, 256), (240, 200, 256))]
    assert due == [False, False, True, False, False, True]
    asked = []
    real = E.stop_check_due
    monkeypatch.setattr(E, "stop_check_due", lambda *a: asked.append(real(*a)) or asked[-1])
    ids, mask = left_padded_batch(tiny_model.config.vocab_size)
    engine = FastDecoder(tiny_model, compile_mode=None, stop_check_every=1)
    engine.generate(ids, mask, 12, [], pad_token_id=0, min_new_tokens=12)  # benchmark mode
    assert len(asked) == 11 and not any(asked)  # tokens 2..12: consulted, never due
    asked.clear()
    engine.generate(ids, mask, 12, [], pad_token_id=0, min_new_tokens=4)
    assert asked == [False, False] + [True] * 8 + [False]  # due once EOS may come, not after the last token


def test_the_step_reads_and_updates_static_buffers_in_place(tiny_model):
    """Every input of the decode step is a buffer marked static, at the same address call after call
    (a CUDA graph then copies nothing in before a replay, and nothing is cloned out after it); a call
    with other EOS ids or another number of them still gives generate's tokens."""
    ids, mask = left_padded_batch(tiny_model.config.vocab_size)
    engine = FastDecoder(tiny_model, compile_mode=None)
    free_run = plain(tiny_model, ids, mask, 12, eos=[])
    engine.generate(ids, mask, 12, [], pad_token_id=0)
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in engine.state.tensors())
    kept = ("token", "position", "cache_position", "mask", "done", "pad", "tokens", "banned")
    addresses = {name: getattr(engine.state, name).data_ptr() for name in kept}
    for eos in ([int(free_run[0, ids.shape[1] + 3])], [int(free_run[1, ids.shape[1] + 2]), int(free_run[0, -1])]):
        assert torch.equal(engine.generate(ids, mask, 12, eos, pad_token_id=0), plain(tiny_model, ids, mask, 12, eos))
    assert {name: getattr(engine.state, name).data_ptr() for name in kept} == addresses  # only eos was resized
    engine.generate(ids[:2], mask[:2], 12, [], pad_token_id=0)  # another batch: new buffers, as for the cache
    assert engine.state.tokens.shape[0] == 2


def test_every_input_of_the_compiled_step_is_static(tiny_model):
    """torch.compile's own account of the step's inputs (the log its CUDA graphs use to decide what
    to copy before each replay, written on CPU too): weights, cache and every state buffer static,
    none copied."""
    import logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("torch._functorch._aot_autograd.frontend_utils.__cudagraph_static_inputs")
    logger.addHandler(handler)
    torch._logging.set_logs(cudagraph_static_inputs=True)
    try:
        ids, mask = left_padded_batch(tiny_model.config.vocab_size)
        FastDecoder(tiny_model, compile_mode="reduce-overhead").generate(ids, mask, 4, [], 0)
    finally:
        torch._logging.set_logs()
        logger.removeHandler(handler)
    static = {m.rpartition("source ")[2] for m in seen if m.startswith("Adding static input")}
    assert {f"L['{name}']" for name in ("token", "position", "cache_position", "mask", "done", "banned", "pad",
                                        "eos", "tokens")} <= static
    assert not [m for m in seen if m.startswith("Non-static input")]


@pytest.mark.parametrize("rows", [3, 1])
def test_joined_projections_run_one_matmul_per_group_with_generates_tokens(tiny_dir, rows):
    """fuse_projections: q/k/v and gate/up each run as one matmul in the compiled step (2 layers: 15
    matmuls become 9 — 7 per layer and the head, then 4 per layer and the head), at batch 1 too,
    with no second copy of the weights and the same tokens as generate."""
    import re

    from transformers import AutoModelForCausalLM

    from torch._inductor.utils import run_and_get_code

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa")
    ids, mask = (t[:rows] for t in left_padded_batch(model.config.vocab_size))
    expected = plain(model, ids, mask, 6, eos=[])
    weights = sum(p.numel() for p in model.parameters())
    matmuls = {}
    for fuse in (False, True):
        torch._dynamo.reset()
        engine = FastDecoder(model, compile_mode="default", fuse_projections=fuse, coordinate_descent=False)
        got, code = run_and_get_code(lambda: engine.generate(ids, mask, 6, [], pad_token_id=0))
        assert torch.equal(got, expected)
        matmuls[fuse] = len(re.findall(r"extern_kernels\.mm\(|_mkl_linear\.default\(|extern_kernels\.addmm\(",
                                       "".join(code)))
    assert (matmuls[False], matmuls[True]) == (15, 9)
    assert engine.fused_projections() == "joined q_proj+k_proj+v_proj, gate_proj+up_proj"
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.weight.untyped_storage().data_ptr() == attention.q_proj.joined_weight.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == weights  # views, not copies
    assert torch.equal(plain(model, ids, mask, 6, eos=[]), expected)  # eager calls after the join: unchanged


def test_projections_join_by_default_only_where_a_compiled_step_has_plain_weights(tiny_model):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from stages.generate.engines import FastEngine
    from stages.settings import GenerateConfig

    def joins(model, **settings) -> bool:
        return FastEngine(GenerateConfig(engine="fast", **settings)).joins_projections(model)

    assert joins(tiny_model)  # unset: compiled step, plain weights
    assert not joins(tiny_model, fast_compile_mode=None) and not joins(tiny_model, fast_fuse_projections=False)
    quantized = torch.nn.Sequential(torch.nn.Linear(32, 32))
    quantize_(quantized, Int8WeightOnlyConfig())
    assert not joins(quantized) and joins(quantized, fast_fuse_projections=True)  # asked for: the rule warns


def test_stops_when_every_row_finished(tiny_model):
    ids, mask = left_padded_batch(tiny_model.config.vocab_size)
    first = plain(tiny_model, ids, mask, 1, eos=[])[:, -1].tolist()
    got = FastDecoder(tiny_model, compile_mode=None, stop_check_every=1).generate(
        ids, mask, 50, first, pad_token_id=0)
    assert got.shape[1] == ids.shape[1] + 1  # every row's first token is an EOS: done after one


def test_trim_matches_where_generate_stops():
    eos = torch.tensor([9])
    tokens = torch.tensor([[1, 9, 0, 0], [1, 2, 9, 0]])
    assert trim_finished(tokens, eos).tolist() == [[1, 9, 0], [1, 2, 9]]
    assert trim_finished(torch.tensor([[1, 9, 0], [1, 2, 3]]), eos).shape[1] == 3  # one never ended


def test_sampling_is_seeded_and_stays_in_top_k(tiny_model):
    from stages.generate.engine import Sampling

    ids, mask = left_padded_batch(tiny_model.config.vocab_size)
    engine = FastDecoder(tiny_model, compile_mode=None, sampling=Sampling(True, 0.8, top_k=1))
    # top_k=1 leaves one candidate: sampling must then give exactly the greedy tokens
    assert torch.equal(engine.generate(ids, mask, 8, [], 0), plain(tiny_model, ids, mask, 8, eos=[]))


def stage_output(tmp_path, *overrides):
    tmp_path.mkdir()
    resolved = resolve(composed("tracker=none", "generate.warmup=1", "generate.repeats=2", *overrides))
    ctx = open_context(resolved, make_plan(resolved), tmp_path)
    result = resolved.stages["generate"].apply(ctx)
    rows = [json.loads(line) for line in (tmp_path / "generate_samples.jsonl").read_text().splitlines()]
    return result, [r["output"] for r in rows]


@pytest.mark.parametrize("model", ["tiny_random", pytest.param("smollm2_135m", marks=pytest.mark.slow)])
def test_generate_fast_gives_the_transformers_output(tmp_path, model):
    common = (f"model={model}", "generate.batch_size=3", "generate.max_new_tokens=16")
    fast, fast_out = stage_output(tmp_path / "fast", *common, "generate=fast")
    ref, ref_out = stage_output(tmp_path / "ref", *common)
    assert fast_out == ref_out
    assert fast.metrics["decode_tokens_per_s"] > 0 and fast.metrics["recompiles_timed"] == 0
    assert fast.tags["generate.decode_attention"] == "optipipe_gqa_decode"  # both models are GQA
    assert fast.tags["generate.kernel_tuning"] == "coordinate_descent"
    if model == "smollm2_135m":
        assert "Paris" in fast_out[0]


def test_decode_step_options_keep_the_mode_and_add_tuning_when_asked():
    from stages.generate.engine import step_compile_options

    assert step_compile_options("reduce-overhead", True) == {"triton.cudagraphs": True,
                                                             "coordinate_descent_tuning": True}
    assert step_compile_options("reduce-overhead", False) == {"triton.cudagraphs": True}
    assert step_compile_options("default", False) == {}
    assert step_compile_options("default", False, realize_opcount=4) == {"realize_opcount_threshold": 4}
    assert step_compile_options("default", False, pdl=True) == {"triton.enable_pdl": True}
    assert step_compile_options("max-autotune", False)["coordinate_descent_tuning"]  # the mode's own
    tiny = torch.nn.Linear(2, 2)
    assert FastDecoder(tiny, compile_mode=None).kernel_tuning() == "eager"
    assert FastDecoder(tiny, coordinate_descent=False).kernel_tuning() == "inductor_default"
    assert FastDecoder(tiny).launch() == "stream_order" and FastDecoder(tiny, compile_mode=None, pdl=True).launch() == "stream_order"
    assert FastDecoder(tiny, pdl=True).launch().startswith("stream_order (programmatic dependent launch needs")  # CPU


def test_fast_engine_rules():
    with pytest.raises(ConfigProblems) as e:
        resolve(composed("model=tiny_random", "tracker=none", "generate=fast", "convert=compile",
                         "generate.fast_compile_mode=turbo", "generate.stop_check_every=0",
                         "generate.fast_realize_opcount=0"))
    keys = {p.key for p in e.value.problems}
    assert {"convert", "generate.fast_compile_mode", "generate.stop_check_every", "generate.fast_realize_opcount"} <= keys
    with pytest.raises(ConfigProblems, match="fast_fuse_projections"):
        resolve(composed("model=tiny_random", "tracker=none", "generate=fast", "generate.fast_fuse_projections=true",
                         "generate.fast_compile_mode=null"))
    with pytest.raises(ConfigProblems) as e:  # a CPU run: the split kernel is for CUDA; an unknown kernel
        resolve(composed("model=tiny_random", "tracker=none", "generate=fast", "generate.fast_decode_attention=split_kv",
                         "generate.fast_gqa_attention=false"))
    fixes = [p.fix for p in e.value.problems if p.key == "generate.fast_decode_attention"]
    assert fixes == ["generate.fast_gqa_attention=true, or generate.fast_decode_attention=sdpa",
                     "generate.fast_decode_attention=sdpa (on CPU)"]
    with pytest.raises(ConfigProblems) as e:  # not grouped-query: split_kv would never run, and the run says so
        resolve(composed("model=tiny_random", "tracker=none", "generate=fast", "generate.fast_decode_attention=split_kv",
                         "+model.config_overrides.num_key_value_heads=4"))
    assert any("not grouped-query" in p.message and p.severity == "warning" for p in e.value.problems)
    with pytest.raises(ConfigProblems) as e:  # programmatic dependent launch: compiled, on CUDA
        resolve(composed("model=tiny_random", "tracker=none", "generate=fast", "generate.fast_pdl=true",
                         "generate.fast_compile_mode=null"))
    assert [p.fix for p in e.value.problems if p.key == "generate.fast_pdl"] == [
        "generate.fast_pdl=false, or a generate.fast_compile_mode", "generate.fast_pdl=false (on CPU)"]
    with pytest.raises(ConfigProblems, match="one of auto, sdpa, split_kv"):
        resolve(composed("model=tiny_random", "tracker=none", "generate=fast", "generate.fast_decode_attention=flash"))
    with pytest.raises(ConfigProblems, match="bitsandbytes kernels cannot be compiled"):
        resolve(composed("model=tiny_random", "tracker=none", "generate=fast", "quantize=nf4"))
    resolve(composed("model=tiny_random", "tracker=none", "generate=fast", "quantize=nf4",
                     "generate.fast_compile_mode=null"))
    quantized = resolve(composed("model=tiny_random", "tracker=none", "generate=fast", "quantize=int8_torchao",
                                 "generate.fast_fuse_projections=true"))  # allowed, with a warning: nothing joins
    assert [w.key for w in quantized.warnings] == ["generate.fast_fuse_projections"]
    rows = resolve(composed("model=tiny_random", "tracker=none", "generate=fast", "quantize=fp8_weight_only",
                            "generate.fast_fuse_projections=true", "generate.fast_realize_opcount=null"))
    assert rows.warnings == []  # float8 rows are plain tensors: they join
    assert FastDecoder(torch.nn.Linear(2, 2), fuse_projections=True).fused_projections().startswith("off (asked for")
    with pytest.raises(ConfigProblems) as e:  # the prefill's graph: compiled prefill only, a bucket of tokens
        resolve(composed("model=tiny_random", "tracker=none", "generate=fast", "generate.fast_prefill_graph=true",
                         "generate.fast_prefill_bucket=0"))
    assert [(p.key, p.fix) for p in e.value.problems if p.severity != "warning"] == [
        ("generate.fast_prefill_bucket", "generate.fast_prefill_bucket=64"),
        ("generate.fast_prefill_graph", "generate.fast_compile_prefill=true, or generate.fast_prefill_graph=false")]
    on_cpu = resolve(composed("model=tiny_random", "tracker=none", "generate=fast", "generate.fast_prefill_graph=true",
                              "generate.fast_compile_prefill=true"))  # allowed: padded and compiled, no graph
    assert [w.key for w in on_cpu.warnings] == ["generate.fast_prefill_graph"]
    assert FastDecoder(torch.nn.Linear(2, 2), prefill_bucket=8).prefill() == "eager"  # no compiled prefill: no graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_engine_with_cuda_graphs_equals_generate(tiny_model):
    model = tiny_model.to("cuda")
    try:
        ids, mask = (t.to("cuda") for t in left_padded_batch(model.config.vocab_size))
        free_run = plain(model, ids, mask, 24, eos=[])
        eos = [int(free_run[0, ids.shape[1] + 5])]
        engine = FastDecoder(model, compile_mode="reduce-overhead", stop_check_every=4)
        for _ in range(2):  # the second call replays the captured graph
            assert torch.equal(engine.generate(ids, mask, 24, eos, pad_token_id=0), plain(model, ids, mask, 24, eos))
        assert (engine.graph_skips, engine.cuda_graphs()) == (0, "captured")
        # batch 1: with coordinate descent every matmul of the step is an M=1 reduction of inductor's
        one = FastDecoder(model, compile_mode="reduce-overhead", coordinate_descent=True)
        assert torch.equal(one.generate(ids[-1:], mask[-1:], 24, [], pad_token_id=0),
                           plain(model, ids[-1:], mask[-1:], 24, eos=[]))
    finally:
        tiny_model.to("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_cuda_graph_equals_generate(tiny_model):
    """fast_prefill_graph on CUDA: the padded prefill captured as a CUDA graph beside the decode step's,
    replayed for a prompt of another length in its bucket, and generate's tokens every time."""
    model = tiny_model.to("cuda")
    try:
        ids, mask = (t.to("cuda") for t in left_padded_batch(model.config.vocab_size))
        engine = FastDecoder(model, compile_mode="reduce-overhead", compile_prefill=True, prefill_bucket=8)
        for cut in (0, 0, 1):  # the second call replays both graphs; the third, a shorter prompt, too
            p, m = ids[:, cut:], mask[:, cut:]
            assert torch.equal(engine.generate(p, m, 24, [], pad_token_id=0), plain(model, p, m, 24, eos=[]))
        assert engine.prefill() == "compiled, prompts left-padded to a multiple of 8 tokens: CUDA graph per padded length"
        assert (engine.prefill_graph_skips, engine.cuda_graphs()) == (0, "captured")
    finally:
        tiny_model.to("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_kv_kernel_on_the_gpu(tiny_model):
    """The split decode-attention kernels on CUDA (their bf16 path too) against PyTorch's ops, and the
    compiled engine with them against generate, token for token."""
    from stages.attention import gqa_decode as G, split_kv_decode as S

    torch.manual_seed(0)
    cases = [(dtype, tol, one) for one in (False, True) for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4))]
    for dtype, tol, one in cases:  # splits combined by a second kernel, then in the last split (counts reserved)
        if one:
            S.reserve_counts(torch.device("cuda", torch.cuda.current_device()))
        for batch, kv_heads, group, dim, length in ((1, 2, 4, 128, 384), (32, 8, 4, 128, 384), (2, 8, 4, 128, 4100)):
            q = torch.randn(batch, kv_heads, group, dim, dtype=dtype, device="cuda")
            k, v = (torch.randn(batch, kv_heads, length, dim, dtype=dtype, device="cuda") for _ in range(2))
            keep = torch.ones(batch, 1, 1, length, dtype=torch.bool, device="cuda")
            keep[..., length // 2:] = False
            for mask in (None, keep):
                err = (S.decode_attention(q, k, v, mask, 0.1).float() - S.reference(q, k, v, mask, 0.1).float()).abs()
                assert err.max().item() <= tol, (dtype, one, batch, kv_heads, length, mask is None, err.max().item())
    model = tiny_model.to("cuda")
    try:
        ids, mask = (t.to("cuda") for t in left_padded_batch(model.config.vocab_size))
        engine = FastDecoder(model, compile_mode="reduce-overhead", decode_kernel=G.SPLIT_KV)
        assert torch.equal(engine.generate(ids, mask, 24, [], pad_token_id=0), plain(model, ids, mask, 24, eos=[]))
    finally:
        tiny_model.to("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 4])
def test_int4_torchao_uses_the_cuda_kernel_and_compiles(tmp_path, batch):
    overrides = ("model=tiny_random", "+model.config_overrides.hidden_size=256",
                 "+model.config_overrides.intermediate_size=512", "load.dtype=bfloat16", "quantize=int4_torchao",
                 "generate=fast", "generate.max_new_tokens=8", f"generate.batch_size={batch}")
    resolved = resolve(composed("tracker=none", "generate.warmup=1", "generate.repeats=2", *overrides))
    ctx = open_context(resolved, make_plan(resolved), tmp_path)
    tags: dict[str, str] = {}
    for name in ("quantize", "convert", "shard", "generate"):
        result = resolved.stages[name].apply(ctx)
        tags.update(result.tags)
    assert result.metrics["recompiles_timed"] == 0 and result.metrics["mbu"] > 0
    assert tags["quantize.int4_kernel"].startswith("tinygemm (") and tags["generate.cuda_graphs"] == "captured"
    # the card's clocks while timed, from NVML (stages/generate/gpu_clocks.py)
    assert tags["generate.gpu_clocks"].startswith("SM ") and result.metrics["gpu_sm_clock_mhz_p50"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("option,method", [("fp8", "torchao_fp8"), ("fp8_weight_only", "float8_rows")])
def test_fp8_quantizes_weights_to_float8_and_compiles(tmp_path, option, method):
    if option == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmuls need compute capability 8.9 or above")
    overrides = ("tracker=none", "model=tiny_random", "+model.config_overrides.hidden_size=256",
                 "+model.config_overrides.intermediate_size=512", "load.dtype=bfloat16", f"quantize={option}",
                 "generate=fast", "generate.max_new_tokens=8", "generate.warmup=1", "generate.repeats=2")
    resolved = resolve(composed(*overrides))
    ctx = open_context(resolved, make_plan(resolved), tmp_path)
    quantized = resolved.stages["quantize"].apply(ctx)
    assert quantized.tags["quantize.method"] == method
    up = ctx.model.model.layers[0].mlp.up_proj.weight
    if option == "fp8":  # torchao: the head stays bf16; activations quantized as they come
        assert quantized.metrics["quantized_layers"] == 2 * 7 and type(up).__name__ == "Float8Tensor"
        assert quantized.tags["quantize.activations"] == "dynamic"
    else:  # float8 rows: plain float8 tensors, the head too
        assert quantized.metrics["quantized_layers"] == 2 * 7 + 1 and up.dtype == torch.float8_e4m3fn
    assert quantized.metrics["compression"] > 1.5  # one byte per weight and a scale per row
    for name in ("convert", "shard"):
        resolved.stages[name].apply(ctx)
    metrics = resolved.stages["generate"].apply(ctx).metrics
    assert metrics["new_tokens"] == 8 and metrics["recompiles_timed"] == 0


def test_gqa_decode_attention_equals_sdpa_with_repeated_heads():
    from transformers.integrations.sdpa_attention import repeat_kv

    from stages.attention.gqa_decode import gqa_decode_attention

    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 3, 8, 2, 11, 16
    q = torch.randn(batch, heads, 1, dim)
    k, v = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :4], mask[2, ..., 7:] = False, False  # left padding; unfilled cache slots
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask, scale=0.3).transpose(1, 2)
    got, _ = gqa_decode_attention(module, q, k, v, mask, scaling=0.3)
    assert got.shape == (batch, 1, heads, dim) and torch.allclose(got, expected, atol=1e-6)
    # a prompt (several query tokens) goes to transformers' SDPA unchanged
    q5 = torch.randn(batch, heads, 5, dim)
    mask5 = torch.ones(batch, 1, 5, length, dtype=torch.bool)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    assert torch.equal(gqa_decode_attention(module, q5, k, v, mask5)[0], sdpa_attention_forward(module, q5, k, v, mask5)[0])


def test_engine_decodes_with_gqa_attention_and_restores_the_model_choice(tiny_model, monkeypatch):
    import stages.attention.gqa_decode as G

    calls = []

    def counting(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    original = G.gqa_decode_attention
    monkeypatch.setattr(G, "gqa_decode_attention", counting)
    ids, mask = left_padded_batch(tiny_model.config.vocab_size)
    expected = plain(tiny_model, ids, mask, 6, eos=[])
    for gqa in (True, False):
        calls.clear()
        got = FastDecoder(tiny_model, compile_mode=None, gqa_attention=gqa).generate(ids, mask, 6, [], 0)
        assert torch.equal(got, expected)
        layers = tiny_model.config.num_hidden_layers
        assert calls == ([ids.shape[1]] * layers + [1] * 5 * layers if gqa else [])
        assert tiny_model.config._attn_implementation == "sdpa"  # evaluate etc. see the user's choice


def test_split_kv_decode_kernel_in_tritons_interpreter():
    """The split decode-attention kernels, run by Triton's CPU interpreter, give the attention of
    PyTorch's ops: several splits, padded rows and head sizes, strided caches, every mask kind."""
    import os
    import subprocess
    import sys

    script = Path(__file__).with_name("split_kv_interpreted.py")
    proc = subprocess.run([sys.executable, str(script)], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok: 80 cases"), proc.stdout + proc.stderr


def test_split_kv_decode_attention_has_the_sdpa_path_layout(monkeypatch):
    """Through gqa_decode_attention the split kernel's (batch, kv_heads, group, dim) output is laid out
    as transformers expects (batch, 1, heads, dim), and compiles as one op (its fake gives the shape)."""
    import stages.attention.gqa_decode as G
    from stages.attention.split_kv_decode import decode_attention

    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 3, 8, 2, 11, 16
    q = torch.randn(batch, heads, 1, dim)
    k, v = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :4], mask[2, ..., 7:] = False, False
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    expected, _ = G.gqa_decode_attention(module, q, k, v, mask, scaling=0.3)
    monkeypatch.setattr(G, "_KERNEL", [G.SPLIT_KV])
    got, _ = G.gqa_decode_attention(module, q, k, v, mask, scaling=0.3)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6)
    # traced whole, as the compiled decode step traces it: no graph break, the op kept as one call
    compiled = torch.compile(lambda *a: G.gqa_decode_attention(module, *a, scaling=0.3)[0], backend="aot_eager",
                             fullgraph=True)
    assert torch.allclose(compiled(q, k, v, mask), got)
    packed = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    assert torch.allclose(decode_attention(packed, k, v, mask, 0.3).reshape(got.shape), got)


def test_engine_decodes_with_the_split_kernel_and_says_so(tiny_model, monkeypatch):
    from stages.attention import gqa_decode as G, split_kv_decode as S

    calls = []
    original = S.reference  # what the op computes on a CPU (the kernels on CUDA)
    monkeypatch.setattr(S, "reference", lambda *a: calls.append(a[0].shape) or original(*a))
    ids, mask = left_padded_batch(tiny_model.config.vocab_size)
    engine = FastDecoder(tiny_model, compile_mode=None, decode_kernel=G.SPLIT_KV)
    assert torch.equal(engine.generate(ids, mask, 6, [], 0), plain(tiny_model, ids, mask, 6, eos=[]))
    assert len(calls) == 5 * tiny_model.config.num_hidden_layers  # every decode step of every layer
    assert engine.decode_attention() == "optipipe_gqa_decode + split_kv kernel" and G._KERNEL[0] == G.SDPA


def test_the_decoder_asks_for_dependent_launches_only_for_a_compiled_step(tiny_model, monkeypatch):
    from stages import kernel_launch

    tiny = torch.nn.Linear(2, 2)
    assert FastDecoder(tiny, pdl=True).launches_dependent()
    assert not FastDecoder(tiny, compile_mode=None, pdl=True).launches_dependent()
    assert not FastDecoder(tiny).launches_dependent()
    seen = []
    original = FastDecoder._generate
    monkeypatch.setattr(FastDecoder, "_generate", lambda self, *a: seen.append(kernel_launch._ON[0]) or original(self, *a))
    ids = torch.tensor([[1, 2, 3]])
    FastDecoder(tiny_model, compile_mode=None, pdl=True).generate(ids, torch.ones_like(ids), 2, [], 0)
    monkeypatch.setattr(FastDecoder, "launches_dependent", lambda self: True)  # as a compiled step asks
    FastDecoder(tiny_model, compile_mode=None).generate(ids, torch.ones_like(ids), 2, [], 0)
    assert seen == [False, True] and kernel_launch._ON[0] is False  # on while generating, off after
