"""Every shipped YAML composes and validates, so no config in conf/ can rot unnoticed."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from pipeline.contract import STAGE_ORDER, ConfigProblems
from pipeline.runner import make_plan
from pipeline.validate import resolve
from tests.conftest import composed

CONF = Path(str(resources.files("conf")))
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_"))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
# Options that need one more value from the user before they mean anything.
COMPLETIONS = {("model", "hub"): ["model.id=smollm2-135m-instruct", "model.source=embedded"],
               ("model", "minilm_l6"): ["generate=encode"], ("model", "tiny_bert_random"): ["generate=encode"],
               ("generate", "encode"): ["model=tiny_bert_random"],
               ("launcher", "torchrun"): ["shard=data_parallel"],
               ("shard", "data_parallel"): ["launcher=torchrun"],
               # SmolLM2 has 9 attention and 3 KV heads: TP over 3 processes
               ("shard", "tensor_parallel"): ["launcher=torchrun", "launcher.nproc_per_node=3"]}


def test_config_tree_has_every_group():
    assert set(GROUPS) >= {"model", "load", "quantize", "convert", "shard", "generate", "evaluate",
                           "tracker", "launcher", "experiment"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = composed(f"{group}={option}", *COMPLETIONS.get((group, option), []))
    try:
        resolved = resolve(cfg)
    except ConfigProblems as e:
        if "CUDA" in str(e) or "GPU" in str(e):
            pytest.skip(f"{group}={option} needs a GPU: {e}")
        raise
    assert list(resolved.stages) == list(STAGE_ORDER)
    plan = make_plan(resolved)
    assert plan.kwargs["use_safetensors"] is True  # safe loading unless the user opts out


def test_default_plan_is_the_embedded_model_on_cpu_or_cuda():
    resolved = resolve(composed())
    assert resolved.model.id == "smollm2-135m-instruct"
    plan = make_plan(resolved)
    assert plan.kwargs["attn_implementation"] == "sdpa"
    assert plan.kwargs["trust_remote_code"] is False
    assert plan.contributed_by["device_map"] == "shard"


def test_an_experiment_file_sets_pipeline_keys():
    """Experiments compose after config.yaml's own block, so their pipeline.* values hold."""
    assert composed("experiment=optuna_search").pipeline.memory_budget_gib == 4.0
    assert composed().pipeline.memory_budget_gib is None


def _settings_of(group: str, node: dict) -> type | None:
    """The dataclass that holds the defaults of a group's YAML (None: a class without settings)."""
    import dataclasses

    from pipeline.config import SECTIONS
    from pipeline.registry import resolve_target

    schema = SECTIONS.get(group) or (resolve_target(node["_target_"], []).Config if "_target_" in node else None)
    return schema if schema is not None and dataclasses.fields(schema) else None


@pytest.mark.parametrize("group,option", [o for o in OPTIONS if o[0] != "experiment"],
                         ids=[f"{g}={o}" for g, o in OPTIONS if g != "experiment"])
def test_a_yaml_starts_from_its_dataclass_and_holds_only_what_differs(group, option):
    """Defaults live once, in the settings dataclass (conf/__init__.py registers them): a YAML names
    them in its defaults list and repeats none of their values."""
    import dataclasses

    import yaml

    node = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
    schema = _settings_of(group, node)
    inherits = [d for d in node.get("defaults", []) if not str(d).startswith(("/defaults_", "_self_"))]
    if schema is None or inherits or (group, option) == ("launcher", "local"):
        return  # no settings, or it starts from another option of its group (which starts from them)
    assert f"/defaults_{schema.__name__}@_here_" in node.get("defaults", []), f"{group}/{option}.yaml"
    defaults = dataclasses.asdict(schema())
    repeated = [k for k, v in node.items() if k not in ("defaults", "_target_") and defaults.get(k, object()) == v]
    repeated += [f"{k}.{s}" for k, v in node.items() if isinstance(v, dict) and isinstance(defaults.get(k), dict)
                 for s, sv in v.items() if defaults[k].get(s, object()) == sv]
    assert not repeated, f"{group}/{option}.yaml repeats defaults of {schema.__name__}: {repeated}"
