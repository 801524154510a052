"""generate: prompts, exact lengths, honest per-token timing, samples."""

from __future__ import annotations

import json

import pytest

from pipeline.runner import make_plan, open_context
from pipeline.validate import resolve
from stages.generate import prompts as P
from stages.generate.clock import Timing, TimingSummary
from tests.conftest import composed


def test_timing_arithmetic_on_a_hand_made_run():
    # prompt at t=0, tokens at 0.10, 0.12, 0.15, 0.16; batch 2; done at 0.20
    t = Timing(start=0.0, steps=[0.10, 0.12, 0.15, 0.16], end=0.20, batch=2)
    assert t.ttft == pytest.approx(0.10)
    assert t.itls == pytest.approx([0.02, 0.03, 0.01])
    assert t.decode_tokens_per_s == pytest.approx(2 * 3 / 0.06)
    assert t.e2e_tokens_per_s == pytest.approx(2 * 4 / 0.20)
    m = TimingSummary([t, Timing(0.0, [0.30, 0.31], 0.4, 2)]).metrics()
    assert m["ttft_ms_p50"] == pytest.approx(200.0)  # median of 100 and 300 ms
    # ITLs are per generation (20, 30, 10 ms, then 10 ms): never the gap between two calls
    assert m["itl_ms_p50"] == pytest.approx(15.0)
    assert m["decode_tokens_per_s"] == pytest.approx(150.0)  # median of 100 and 200 tok/s
    assert m["decode_tokens_per_s_spread_pct"] == pytest.approx(100 * (200 - 100) / 150)


def test_unsteady_timings_are_called_noisy_with_the_reason():
    from stages.generate.clock import noise

    steady = Timing(0.0, [0.10, 0.11, 0.12, 0.13], 0.14, 1)
    assert noise(TimingSummary([steady, steady]).metrics(), cuda=True) == ""
    slower = Timing(0.0, [0.10, 0.12, 0.14, 0.16], 0.17, 1)  # half the decode speed
    text = noise(TimingSummary([steady, slower]).metrics(), cuda=False)
    assert "repeats spread 67 %" in text and "host load average" in text
    stall = Timing(0.0, [0.10, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.17, 0.18, 0.19, 0.40], 0.41, 1)
    assert "ITL p90/p50" in noise(TimingSummary([stall]).metrics(), cuda=True)
    # 15 % apart: unsteady for a GPU, ordinary for a CPU shared with the rest of the host
    a, b = Timing(0.0, [0.10, 0.11, 0.12, 0.13], 0.13, 1), Timing(0.0, [0.10, 0.1115, 0.123, 0.1345], 0.135, 1)
    assert "repeats spread" in noise(TimingSummary([a, b]).metrics(), cuda=True)
    assert "repeats spread" not in noise(TimingSummary([a, b]).metrics(), cuda=False)


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert P.read_prompt_file(str(tmp_path / "p.txt")) == ["first", "second"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert P.read_prompt_file(str(tmp_path / "p.jsonl")) == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(P.PromptError, match="bad.jsonl:1"):
        P.read_prompt_file(str(tmp_path / "bad.jsonl"))
    assert P.batch_of(["a", "b"], 5) == ["a", "b", "a", "b", "a"]
    # what the README promises: batch 1 answers the first built-in prompt, batch 8 all of them
    assert P.batch_of(list(P.DEFAULT_PROMPTS), 1) == ["What is the capital of France?"]
    assert P.batch_of(list(P.DEFAULT_PROMPTS), 8) == list(P.DEFAULT_PROMPTS) and len(P.DEFAULT_PROMPTS) == 8


def run_generate(tmp_path, *overrides):
    resolved = resolve(composed("tracker=none", "model=tiny_random", "generate.warmup=1",
                                "generate.repeats=2", *overrides))
    ctx = open_context(resolved, make_plan(resolved), tmp_path)
    return ctx, resolved.stages["generate"].apply(ctx)


def test_benchmark_mode_forces_exact_lengths(tmp_path):
    ctx, result = run_generate(tmp_path, "generate.benchmark=true", "generate.prompt_tokens=16",
                               "generate.max_new_tokens=12", "generate.batch_size=3")
    assert result.metrics["prompt_tokens"] == 16 and result.metrics["new_tokens"] == 12
    assert result.metrics["repeats"] == 2
    rows = [json.loads(line) for line in (tmp_path / "generate_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for key in ("ttft_ms_p50", "ttft_ms_p90", "itl_ms_p50", "itl_ms_p90", "e2e_tokens_per_s"):
        assert result.metrics[key] > 0


def test_greedy_output_is_what_plain_generate_gives(tmp_path):
    ctx, _ = run_generate(tmp_path, "generate.max_new_tokens=10", "generate.benchmark=true",
                          "generate.prompts=[hello world]")
    ids = ctx.tokenizer(["hello world"], return_tensors="pt")
    plain = ctx.model.generate(**ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    expected = ctx.tokenizer.decode(plain[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    row = json.loads((tmp_path / "generate_samples.jsonl").read_text().splitlines()[0])
    assert row["output"] == expected


def test_sampling_repeats_are_seeded(tmp_path):
    ctx, result = run_generate(tmp_path, "generate.do_sample=true", "generate.temperature=0.8",
                               "generate.benchmark=true", "generate.max_new_tokens=6")
    assert result.tags["generate.mode"] == "sample"


def test_chat_template_used_when_the_tokenizer_has_one(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert not P.use_chat_template(tok, "auto")
    tok.chat_template = "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"
    assert P.use_chat_template(tok, "auto") and not P.use_chat_template(tok, "off")
    ids = P.encode(tok, ["hi"], chat=True, exact_tokens=None)["input_ids"][0]
    assert tok.decode(ids) == "<<hi>>"
