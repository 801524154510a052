"""stages/generate/auto_levers.py: what the fast engine's unset levers become, and that a set one is kept."""

import pytest
import torch

from stages.attention.gqa_decode import SDPA, SPLIT_KV
from stages.generate.auto_levers import AUTO, decide, for_model
from stages.settings import GenerateConfig
from stages.shard.tp_layers import RowParallelLinear


@pytest.mark.parametrize("tp, split_kv_ok, pdl_ok, kernel, pdl", [
    (True, True, True, SPLIT_KV, True),  # TP on a Hopper GPU with Triton: both levers
    (True, False, True, SDPA, True),  # no Triton: the split kernel cannot run, PDL still can
    (True, True, False, SPLIT_KV, False),  # an older GPU (or eager step): no PDL
    (False, True, True, SDPA, False),  # one process: neither is shown to win there
])
def test_unset_levers_follow_tensor_parallel_and_what_can_run(tp, split_kv_ok, pdl_ok, kernel, pdl):
    levers = decide(AUTO, None, tp, split_kv_ok, pdl_ok)
    assert (levers.decode_attention, levers.pdl) == (kernel, pdl)
    assert ("tensor-parallel layers" if tp else "one process") in levers.why
    assert ("cannot run here" in levers.why) == (tp and not (split_kv_ok and pdl_ok))


def test_a_set_lever_is_kept_and_only_the_unset_one_is_chosen():
    kept = decide(SDPA, False, True, True, True)
    assert (kept.decode_attention, kept.pdl, kept.why) == (SDPA, False, "as set")
    forced = decide(SPLIT_KV, True, False, False, False)  # the rules refuse what cannot run; kept here
    assert (forced.decode_attention, forced.pdl) == (SPLIT_KV, True)
    half = decide(SDPA, None, True, True, True)
    assert (half.decode_attention, half.pdl, half.why) == (SDPA, True, "programmatic dependent launch: tensor-parallel layers")


def test_for_model_sees_our_tensor_parallel_layers_on_the_cpu():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    sharded = torch.nn.Sequential(RowParallelLinear(4, 4))
    settings = GenerateConfig()
    one = for_model(plain, settings)
    assert (one.decode_attention, one.pdl, one.why) == (SDPA, False, "decode attention sdpa, stream-order launch: one process")
    tp = for_model(sharded, settings)  # a CPU: neither lever can run
    assert (tp.decode_attention, tp.pdl) == (SDPA, False) and "tensor-parallel layers (" in tp.why
