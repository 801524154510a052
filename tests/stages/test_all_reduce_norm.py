"""The all-reduce + residual add + RMSNorm fusion (stages/shard/all_reduce_norm.py) on a CPU: the
graph pass finds every such pattern of a Llama under our TP layers (and nothing else), the fused
op's unfused path computes what the model computes, and ``shard.fuse_norm=false`` leaves the graph
alone; and the kernel itself, in Triton's interpreter with processes as ranks
(push_kernel_interpreted.py). On GPUs, the GPU test in tests/pipeline/test_distributed.py runs it
inside the engine and compares the text with one GPU's."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from stages.shard import all_reduce_norm
from stages.shard.all_reduce import AllReduce
from stages.shard.all_reduce_norm import FuseAllReduceNorm, add_rms_norm
from stages.shard.tp_layers import localize

LAYERS = 3


@pytest.fixture(scope="module")
def group():
    """One gloo process: our layers and all-reduce run (a sum over one rank), as on a CPU."""
    with tempfile.NamedTemporaryFile() as store:
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
        yield dist.group.WORLD
        dist.destroy_process_group()


def tiny_llama(group, dtype: torch.dtype, fuse_norm: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101)
    model = LlamaForCausalLM(config).eval().to(dtype)
    reduce = AllReduce(group, torch.device("cpu"), dtype=dtype)
    reduce.fuse_norm = fuse_norm
    assert localize(model, reduce, 0, 1).row == 2 * LAYERS
    return model


def compiled_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Logits of a compiled forward with the pass, and how many patterns the pass fused."""
    fuse = FuseAllReduceNorm()
    options = {"post_grad_custom_post_pass": fuse, "fx_graph_cache": False}  # the pass must run, not a cache
    torch._dynamo.reset()
    with torch.inference_mode():
        logits = torch.compile(lambda t: model(input_ids=t).logits, fullgraph=True, options=options)(ids)
    return logits, fuse.fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_all_reduce_add_norm_of_a_llama_is_fused(group, dtype):
    """Two per layer (attention and MLP ends; the last one meets the final norm), in float32 and in
    bf16 (where RMSNorm upcasts): the compiled model's logits are the eager ones."""
    model = tiny_llama(group, dtype)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        eager = model(input_ids=ids).logits
    all_reduce_norm.RUNS.clear()
    logits, fused = compiled_logits(model, ids)
    assert fused == 2 * LAYERS
    assert all_reduce_norm.RUNS == {"unfused": 2 * LAYERS}  # gloo: the op's unfused path, not the kernel
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.05}
    torch.testing.assert_close(logits, eager, **tolerance)


def test_fuse_norm_off_leaves_the_graph_alone(group):
    model = tiny_llama(group, torch.float32, fuse_norm=False)
    all_reduce_norm.RUNS.clear()
    _, fused = compiled_logits(model, torch.tensor([[3, 4]]))
    assert fused == 0 and all_reduce_norm.RUNS == {}


def test_the_unfused_path_is_the_models_own_add_and_rms_norm():
    """Bit for bit what the decoder layer computes: residual + sum, then transformers' RMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(1)
    norm = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(64, dtype=torch.bfloat16)
    residual, summed = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(3, 64, dtype=torch.bfloat16)
    h, normed = add_rms_norm(summed, residual, norm.weight, 1e-5, upcast=True)
    assert torch.equal(h, residual + summed) and torch.equal(normed, norm(residual + summed))


def test_patterns_that_are_not_an_rms_norm_stay_apart(group):
    """An all-reduce whose sum is added but normalized another way (here over no weight, and a mean
    over the first dimension) is not rewritten."""
    reduce = AllReduce(group, torch.device("cpu"), dtype=torch.float32)

    def not_a_norm(x, residual, weight):
        h = residual + reduce(x)
        return h, weight * (h * torch.rsqrt(h.pow(2).mean(0, keepdim=True) + 1e-6))

    def plain_sum(x, residual, weight):
        return residual + reduce(x), weight

    fuse = FuseAllReduceNorm()
    options = {"post_grad_custom_post_pass": fuse, "fx_graph_cache": False}
    x, residual, weight = torch.randn(2, 8), torch.randn(2, 8), torch.randn(8)
    for fn in (not_a_norm, plain_sum):
        torch._dynamo.reset()
        with torch.inference_mode():
            got = torch.compile(fn, fullgraph=True, options=options)(x, residual, weight)
        torch.testing.assert_close(got, fn(x, residual, weight))
        assert fuse.fused == 0, fn.__name__


@pytest.mark.parametrize("world, dtype, wait", [(2, "bfloat16", "in_turn"), (4, "float32", "in_turn"),
                                               (4, "bfloat16", "together"), (3, "float32", "together")])
def test_the_pushing_kernel_in_tritons_interpreter(world, dtype, wait):
    """The kernel's protocol (push to every rank, wait for every peer's row, rotate and empty the
    receive areas) with processes as ranks, several calls in a row, waiting for one peer after another
    or for all at once (shard.fuse_norm_wait; 3 ranks: a tile of 4 with one masked): push_kernel_interpreted.py."""
    pytest.importorskip("triton")
    script = Path(__file__).with_name("push_kernel_interpreted.py")
    done = subprocess.run([sys.executable, str(script), str(world), dtype, wait], capture_output=True, text=True,
                          timeout=400, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]
