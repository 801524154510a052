"""evaluate: perplexity equals the textbook computation; agreement, gate, cache and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.contract import ConfigProblems, StageError
from pipeline.runner import make_plan, open_context
from pipeline.validate import resolve
from stages.evaluate import corpus
from stages.evaluate.perplexity import perplexity, rolling_windows, windows
from tests.conftest import TINY, composed, mlflow_runs, run_cli


def textbook_perplexity(model, ids, max_length, stride):
    """The loop of the transformers guide, one window at a time, with the model's own loss."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + max_length, ids.numel())
        target = ids[begin:end].clone()
        target[: -(end - prev_end)] = -100
        with torch.inference_mode():
            loss = model(input_ids=ids[begin:end][None], labels=target[None]).loss
        valid = int((target[1:] != -100).sum())  # the model shifts labels by one
        nll, count, prev_end = nll + float(loss) * valid, count + valid, end
        if end == ids.numel():
            break
    return math.exp(nll / count), count


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("max_length,stride,batch", [(64, 64, 1), (64, 16, 3), (50, 25, 8)])
def test_perplexity_equals_the_textbook_loop(tiny, max_length, stride, batch):
    ids = torch.randint(4, 260, (700,), generator=torch.Generator().manual_seed(0))
    expected, count = textbook_perplexity(tiny, ids, max_length, stride)
    got = perplexity(tiny, ids, max_length, stride, batch)
    assert got.scored_tokens == count
    if stride < max_length:  # overlapping windows give every token but the first a context
        assert count == ids.numel() - 1
    else:  # disjoint windows: each window's first token has nothing to be predicted from
        assert count == ids.numel() - math.ceil(ids.numel() / max_length)
    assert got.perplexity == pytest.approx(expected, rel=1e-5)


def test_windows_cover_the_corpus_once():
    ws = windows(100, 40, 40)  # disjoint: a window's first token has no context in it
    assert [(w.begin, w.end, w.targets) for w in ws] == [(0, 40, 39), (40, 80, 39), (80, 100, 19)]
    assert sum(w.targets for w in windows(100, 40, 10)) == 99  # every token but the corpus's first
    assert [(w.begin, w.end, w.targets) for w in windows(30, 256, 128)] == [(0, 30, 29)]  # shorter than a window


def test_offline_default_corpus_is_deterministic_and_not_empty():
    a, b = corpus.stdlib_docs(5000), corpus.stdlib_docs(5000)
    assert len(a.text) == 5000 and a.sha256 == b.sha256 and "stdlib" in a.name


def test_unreachable_dataset_is_a_clear_error():
    with pytest.raises(corpus.CorpusError, match="datasets|cannot be loaded"):
        corpus.from_dataset("no-such/dataset", None, "test", None, 1000)


@pytest.mark.parametrize("overrides,key", [
    (("evaluate.stride=0",), "evaluate.stride"), (("evaluate.stride=999",), "evaluate.stride"),
    (("evaluate.corpus.file=/no/such/file.txt",), "evaluate.corpus.file")])
def test_bad_settings_are_config_problems(overrides, key):
    with pytest.raises(ConfigProblems, match=key.replace(".", r"\.")):
        resolve(composed("model=tiny_random", "evaluate=quality", *overrides))


def test_empty_corpus_file(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConfigProblems, match="is empty"):
        resolve(composed("model=tiny_random", "evaluate=quality", f"evaluate.corpus.file={tmp_path}/empty.txt"))


# a third of the default corpus and half the continuation: the real model's comparisons keep their
# meaning (hundreds of compared positions) at half the suite's time for them
SHORTER = ("evaluate.corpus.max_chars=3000", "evaluate.new_tokens=16")


def evaluated(tmp_path, *overrides, shared_cache: bool = False):
    """The evaluate stage and a loaded context. ``shared_cache``: the model's converted weights come
    from the suite's cache (SmolLM2's GGUF conversion costs ~17 s), no cached reference is reused."""
    cache = "evaluate.cache=false" if shared_cache else f"load.cache_dir={tmp_path}/cache"
    resolved = resolve(composed("tracker=none", "model=tiny_random", "evaluate=quality", cache, *overrides))
    ctx = open_context(resolved, make_plan(resolved), tmp_path)
    resolved.stages["load"].apply(ctx)
    return resolved.stages["evaluate"], ctx


def test_corpus_of_one_token_is_a_clear_error(tmp_path):
    (tmp_path / "short.txt").write_text("a")
    stage, ctx = evaluated(tmp_path, f"evaluate.corpus.file={tmp_path}/short.txt")
    with pytest.raises(StageError, match="nothing to predict"):
        stage.apply(ctx)


def test_reference_that_does_not_fit_is_refused(tmp_path):
    stage, ctx = evaluated(tmp_path)
    ctx.facts.parameters = 1e14  # 400 TB in float32
    with pytest.raises(StageError, match="reference model needs"):
        stage.apply(ctx)


def test_identical_model_agrees_fully_and_gate_passes(tmp_path):
    stage, ctx = evaluated(tmp_path, "convert=eager", "evaluate.gate.min_top1_agreement=0.999",
                           "evaluate.gate.max_kl=1e-6")
    result = stage.apply(ctx)
    m = result.metrics
    assert m["top1_agreement"] == 1.0 and m["token_agreement"] == 1.0
    assert m["perplexity_increase_pct"] == pytest.approx(0.0, abs=1e-6)
    assert result.tags["evaluate.gate"] == "pass" and result.tags["evaluate.reference_cache"] == "miss"
    assert stage.apply(ctx).tags["evaluate.reference_cache"] == "hit"


def test_enforced_gate_fails_the_run_and_names_the_threshold(tmp_path):
    proc = run_cli(*TINY, "evaluate=gated", "evaluate.gate.min_top1_agreement=1.01", f"load.cache_dir={tmp_path}/c",
                   cwd=tmp_path, check=1)
    assert "evaluate.gate.min_top1_agreement=1.01" in proc.stdout + proc.stderr
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["evaluate.gate"] == "fail"
    assert "evaluate/top1_agreement" in runs[0].data.metrics  # the numbers behind the verdict


def test_reference_is_computed_once_per_sweep(tmp_path):
    run_cli("-m", *TINY, "evaluate=quality", "generate.batch_size=1,2", f"load.cache_dir={tmp_path}/c",
            cwd=tmp_path, check=0)
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags),
                      key=lambda r: r.data.params["generate.batch_size"])
    assert [r.data.tags["evaluate.reference_cache"] for r in children] == ["miss", "hit"]


def test_encoder_embeddings_compared_by_cosine(tmp_path):
    run_cli("model=tiny_bert_random", "generate=encode", "generate.repeats=1", "evaluate=quality",
            "evaluate.gate.min_cosine=0.9999", f"load.cache_dir={tmp_path}/c", cwd=tmp_path, check=0)
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    assert runs[0].data.metrics["evaluate/cosine_min"] > 0.9999
    assert runs[0].data.tags["evaluate.gate"] == "pass"


@pytest.mark.slow
def test_smollm2_sdpa_agrees_with_its_eager_reference(tmp_path):
    """float32 on CPU: SDPA and eager differ only in summation order, so greedy tokens are identical;
    top-1 may flip only at exact near-ties, hence ≥ 0.995 rather than 1.0."""
    stage, ctx = evaluated(tmp_path, "model=smollm2_135m", "convert=sdpa", *SHORTER, shared_cache=True)
    m = stage.apply(ctx).metrics
    assert m["token_agreement"] == 1.0 and m["top1_agreement"] >= 0.995 and m["kl_mean"] < 1e-5
    assert abs(m["perplexity_increase_pct"]) < 0.01


@pytest.mark.slow
def test_smollm2_int8_changes_quality_measurably_but_boundedly(tmp_path):
    # LLM.int8 is slow on a CPU: a shorter corpus (~400 tokens) still shows a bounded, measurable change
    stage, ctx = evaluated(tmp_path, "model=smollm2_135m", "quantize=int8", "evaluate.corpus.max_chars=1500",
                           "evaluate.new_tokens=8", shared_cache=True)
    m = stage.apply(ctx).metrics
    assert 0.01 < abs(m["perplexity_increase_pct"]) < 50
    assert 0.5 < m["top1_agreement"] < 1.0 and m["kl_mean"] > 1e-4


def lm_eval_rolling_nll(model, ids: torch.Tensor, max_length: int, prefix: int) -> tuple[float, int]:
    """lm-eval's loglikelihood_rolling as (context, continuation) requests: each continuation of up
    to max_length tokens is scored from the tokens before it, the input cut to its last max_length."""
    toks, seq, nll, pos = ids.tolist(), [prefix] + ids.tolist(), 0.0, 0
    while pos < len(toks):
        w = min(max_length, len(toks) - pos)
        cont, context = toks[pos:pos + w], seq[max(0, pos + w - max_length):pos + 1]
        inp = (context + cont)[-(max_length + 1):][:-1]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([inp])).logits[0, -w:].float()
        nll -= float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None]).sum())
        pos += w
    return nll, len(toks)


@pytest.mark.parametrize("length,max_length,batch", [(100, 40, 1), (130, 64, 4), (30, 256, 2)])
def test_rolling_windows_match_lm_eval_loglikelihood_rolling(tiny, length, max_length, batch):
    ids = torch.randint(4, 260, (length,), generator=torch.Generator().manual_seed(1))
    ws = rolling_windows(length, max_length)
    assert sum(w.targets for w in ws) == length  # every token once, the first one too (from the prefix)
    assert ws[0].begin == 0 and all(w.end - w.begin <= max_length for w in ws)
    assert all(w.end - w.begin == max_length for w in ws[1:])  # later windows back-filled to full context
    expected, count = lm_eval_rolling_nll(tiny, ids, max_length, prefix=1)
    got = perplexity(tiny, ids, max_length, max_length, batch, windowing="rolling", prefix_token=1)
    assert got.scored_tokens == count and got.nll_sum == pytest.approx(expected, rel=1e-6)


def test_perplexity_only_run_skips_generation_and_fits_a_short_corpus(tmp_path, monkeypatch):
    """generate=none + evaluate=perplexity: no greedy continuation (no reference needs it), and a
    window longer than the corpus is one full-context window, not an error."""
    from stages.evaluate.stage import Evaluate

    monkeypatch.setattr(Evaluate, "greedy", lambda *a: pytest.fail("greedy continuation without a reference"))
    stage, ctx = evaluated(tmp_path, "generate=none", "evaluate=perplexity", "evaluate.windowing=rolling",
                           "evaluate.max_length=100000", "evaluate.corpus.max_chars=400")
    resolved = resolve(composed("tracker=none", "model=tiny_random", "generate=none"))
    assert resolved.stages["generate"].apply(ctx).summary == "skipped (generate=none)"
    result = stage.apply(ctx)
    tokens = len(ctx.tokenizer(corpus.stdlib_docs(400).text, add_special_tokens=False)["input_ids"])
    assert result.metrics["windows"] == 1 and result.metrics["scored_tokens"] == tokens
    assert "fits one window" in result.tags["evaluate.windows_note"] and result.tags["evaluate.windowing"] == "rolling"
