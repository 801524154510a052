"""Our tensor-parallel layers and their all-reduce, over 2 real gloo processes: row-parallel sums,
the vocabulary-parallel gather and greedy choice (uneven split included), compiled equals eager, and
the fallback that a CPU takes (and says why)."""

from __future__ import annotations

import os
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stages.shard.all_reduce import AllReduce, self_test
from stages.shard.tp_layers import RowParallelLinear, VocabParallelHead, plan_style, split_head


def _worker(rank: int, world: int, store: str, errors) -> None:
    failed = False
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        with torch.inference_mode():  # as the pipeline runs them
            _checks(rank, world)
    except BaseException as e:  # reported to the parent, which fails the test with it
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        failed = True
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without the interpreter's teardown (as pipeline ranks do): a thread left by compiling has,
    # now and then, aborted it ("terminate called without an active exception") after every check passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)


def _checks(rank: int, world: int) -> None:
    cpu = torch.device("cpu")
    reduce = AllReduce(dist.group.WORLD, cpu, "auto")
    assert reduce.kind == "gloo" and "not CUDA" in reduce.why_not_symm
    assert self_test(reduce, cpu, rank, world)
    try:
        AllReduce(dist.group.WORLD, cpu, "symm_mem")
        raise AssertionError("symm_mem on a CPU must refuse, not fall back")
    except RuntimeError as e:
        assert "not CUDA" in str(e)
    torch.manual_seed(0)  # every rank builds the same full layers, then keeps its own slice
    x, w_row, w_head = torch.randn(3, 5, 8), torch.randn(6, 8), torch.randn(7, 8)  # vocab 7: chunks 4 + 3
    row = RowParallelLinear(4, 6, bias=True)
    row.weight = torch.nn.Parameter(w_row[:, rank * 4:(rank + 1) * 4].clone())
    row.bias = torch.nn.Parameter(torch.arange(6.0))
    row.reduce = reduce
    expected_row = x @ w_row.t() + torch.arange(6.0)
    torch.testing.assert_close(row(x[..., rank * 4:(rank + 1) * 4]), expected_row)
    head = VocabParallelHead(8, 4, bias=False)
    head.weight = torch.nn.Parameter(w_head[rank * 4:(rank + 1) * 4].clone())
    head.reduce, head.vocab, head.first = reduce, 7, rank * 4
    torch.testing.assert_close(head(x), x @ w_head.t())
    compiled = torch.compile(lambda t: head(t), fullgraph=True)  # the custom ops trace without a break
    torch.testing.assert_close(compiled(x), x @ w_head.t())
    _greedy_checks(head, x, w_head, rank)


def _greedy_checks(head: VocabParallelHead, x: torch.Tensor, w_head: torch.Tensor, rank: int) -> None:
    """The greedy choice through local logits is the full-vocabulary argmax: banned tokens skipped,
    ties to the lowest index (across ranks too), compiled as eager."""
    full = (x @ w_head.t())[:, -1]
    with head.local_logits():
        local = head(x)[:, -1]
    assert head.full_logits and local.shape[-1] == (4, 3)[rank]
    none = torch.zeros(7, dtype=torch.bool)
    assert torch.equal(head.greedy(local, none), full.argmax(-1))
    banned = none.clone().index_fill_(0, full.argmax(-1), True)
    assert torch.equal(head.greedy(local, banned), full.masked_fill(banned, float("-inf")).argmax(-1))
    tied = torch.tensor([[1.0, 5, 2, 5, 5, 0, 5], [0, 1, 0, 1, 3, 3, 0]])  # row 0: ranks tie; row 1: rank 1 ties
    slice_ = tied[:, :4] if rank == 0 else tied[:, 4:]
    assert head.greedy(slice_, none).tolist() == [1, 4]
    no_columns = local if rank == 0 else local[:, :0]  # an uneven split may leave a rank nothing
    assert torch.equal(head.greedy(no_columns, none), full[:, :4].argmax(-1))
    compiled = torch.compile(head.greedy, fullgraph=True)
    assert torch.equal(compiled(local, banned), head.greedy(local, banned))


def test_row_and_vocab_parallel_layers_over_two_gloo_ranks():
    errors = mp.get_context("spawn").SimpleQueue()
    crashed = None
    with tempfile.NamedTemporaryFile() as store:
        try:
            mp.start_processes(_worker, args=(2, store.name, errors), nprocs=2, start_method="spawn")
        except mp.ProcessExitedException as e:  # a rank that failed its checks exits 1: its message first
            crashed = e
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems and crashed is None, (problems, crashed)


@pytest.mark.parametrize("name, style", [("model.layers.0.self_attn.q_proj", "colwise"),
                                         ("model.layers.12.mlp.down_proj", "rowwise"), ("lm_head", "colwise_gather_output"),
                                         ("model.layers.3.input_layernorm", None)])
def test_plan_style_reads_layer_numbers_as_wildcards(name, style):
    plan = {"model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.mlp.down_proj": "rowwise",
            "lm_head": "colwise_gather_output"}
    assert plan_style(name, plan) == style


def test_greedy_goes_through_the_split_head_unless_switched_off():
    head = VocabParallelHead(8, 4, bias=False)
    head.vocab = 7
    model = SimpleNamespace(get_output_embeddings=lambda: head)
    assert split_head(model) is head
    head.split_greedy = False  # shard.split_greedy=false: the logits are gathered, as before
    assert split_head(model) is None
    head.split_greedy, head.vocab = True, (1 << 24) + 1  # indices a float32 cannot hold exactly
    assert split_head(model) is None
    assert split_head(SimpleNamespace(get_output_embeddings=lambda: torch.nn.Linear(8, 7))) is None
