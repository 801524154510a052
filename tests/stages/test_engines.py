"""A decode engine added by one class and one YAML, with no edit to any stage."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from pipeline.contract import ConfigProblems, Problem
from pipeline.validate import resolve
from tests.conftest import TINY, composed, generate_in_process, mlflow_runs, run_cli


@dataclass
class LoopOptions:
    label: str = "loop"


class NoCacheLoop:
    """A plugin engine: greedy decoding by calling the model's forward on the whole sequence each step."""

    name = "no_cache_loop"
    Config = LoopOptions

    def __init__(self, settings, options: LoopOptions) -> None:
        self.settings, self.options = settings, options

    def problems(self, root) -> list[Problem]:
        return [] if not self.settings.do_sample else [
            Problem("generate.do_sample", "no_cache_loop decodes greedily", "generate.do_sample=false")]

    def compiled(self) -> bool:
        return False

    def generate(self, model, inputs, kwargs, eos, clock) -> torch.Tensor:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        with torch.inference_mode():
            for _ in range(kwargs["max_new_tokens"]):
                logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
                clock(ids, logits)
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return ids

    def tags(self, model) -> dict[str, str]:
        return {"generate.loop_label": self.options.label}


def tokens(folder) -> list[list[int]]:
    return [json.loads(line)["token_ids"] for line in (folder / "generate_samples.jsonl").read_text().splitlines()]


COMMON = (*TINY, "generate.max_new_tokens=6", "generate.benchmark=true", "generate.batch_size=2", "load.dtype=float32",
          "pipeline.allow=[tests]")


def test_a_plugin_engine_is_one_class_and_one_yaml(tmp_path):
    conf = tmp_path / "conf" / "generate"
    conf.mkdir(parents=True)
    (conf / "no_cache_loop.yaml").write_text(
        "defaults:\n  - default\n  - _self_\nengine: tests.stages.test_engines.NoCacheLoop\n")
    run_cli("--config-dir", str(tmp_path / "conf"), *COMMON, "generate=no_cache_loop",
            "+generate.engine_options.label=mine", f"hydra.run.dir={tmp_path}/loop", cwd=tmp_path, check=0)
    assert tokens(tmp_path / "loop") == tokens(generate_in_process(tmp_path / "plain", *COMMON))  # model.generate's greedy tokens
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    tags = runs[0].data.tags
    assert tags["generate.engine"] == "no_cache_loop" and tags["generate.loop_label"] == "mine"
    assert runs[0].data.metrics["generate/decode_tokens_per_s"] > 0  # timed by the stage's own clock


def test_a_plugin_engines_options_and_rules_are_checked_before_loading():
    engine = ("generate.engine=tests.stages.test_engines.NoCacheLoop",)
    with pytest.raises(ConfigProblems) as info:
        resolve(composed(*COMMON, *engine, "generate.do_sample=true", "+generate.engine_options.lable=x"))
    said = str(info.value)
    assert "generate.do_sample: no_cache_loop decodes greedily" not in said  # its options are checked first
    assert "generate.engine_options.lable: unknown key" in said and "did you mean 'label'" in said
    with pytest.raises(ConfigProblems, match="generate.do_sample: no_cache_loop decodes greedily"):
        resolve(composed(*COMMON, *engine, "generate.do_sample=true"))
