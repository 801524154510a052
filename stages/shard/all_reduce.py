"""The all-reduce that tensor-parallel layers run, chosen once per process group.

A decode step of an 8B Llama at batch 1 all-reduces 64 messages of 8 KB (after every attention
output and MLP down projection). NCCL's ring costs about 26 µs for each inside a CUDA graph (H200
profile of the TP2 decode step), as much as the halved matmuls save. GPUs that map each other's
memory over NVLink can do better for such small messages with torch's symmetric memory: every rank
copies its part into a buffer its peers can read, and one kernel reads all parts and sums them —
one hop instead of a ring ("one-shot"). Messages over the buffer's size, CPUs (gloo) and GPUs
without peer access use the process group's own all-reduce; ``kind`` says which one runs.

The layers' matmuls stay outside the ops, where ``torch.compile`` can fuse and tune them (at batch
1 inductor turns them into tuned reductions); the one-shot kernel copies the local partial sum
into the shared buffer itself (``one_shot_all_reduce_copy``: no copy kernel per reduction).
``torch.compile`` keeps the ops whole in its graph (no graph break) and a CUDA graph captures their
kernels; the buffer is allocated and exchanged before any capture.
"""

from __future__ import annotations

import math
from typing import Any

import torch

ONE_SHOT = "symm_mem_one_shot"
PUSH_COPIES = 3  # the fused kernel's receive areas rotate over 3 copies (stages/shard/all_reduce_norm.py)
# an empty slot of a receive area holds -0.0 of the messages' dtype (senders never send -0.0): its bits
EMPTY_BITS = {torch.bfloat16: (torch.int16, -(1 << 15)), torch.float16: (torch.int16, -(1 << 15)),
              torch.float32: (torch.int32, -(1 << 31))}
MODES = ("auto", "symm_mem", "process_group")
# how the fused kernel (all_reduce_norm.py) waits for its peers' rows (shard.fuse_norm_wait): one peer
# after another, each its own memory round trip (in_turn), or all of them in one load a poll, with
# the residual and weight read before the wait (together)
WAIT_IN_TURN, WAIT_TOGETHER = "in_turn", "together"
WAITS = (WAIT_IN_TURN, WAIT_TOGETHER)
REDUCERS: dict[str, "AllReduce"] = {}  # the op finds its reducer by name (a string is graph-constant)


@torch.library.custom_op("optipipe::tp_all_reduce", mutates_args=())
def tp_all_reduce(x: torch.Tensor, reducer: str) -> torch.Tensor:
    """Sum of ``x`` over the reducer's group, as a new tensor (same on every rank)."""
    return REDUCERS[reducer].run(x)


@tp_all_reduce.register_fake
def _(x: torch.Tensor, reducer: str) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("optipipe::tp_gather_columns", mutates_args=())
def tp_gather_columns(y: torch.Tensor, reducer: str, width: int) -> torch.Tensor:
    """Every rank's ``y`` side by side, cut to ``width`` columns: a vocabulary-parallel head's full
    logits (each rank holds ``ceil(width / world)`` columns, the last rank fewer)."""
    return REDUCERS[reducer].gather_columns(y, width)


@tp_gather_columns.register_fake
def _(y: torch.Tensor, reducer: str, width: int) -> torch.Tensor:
    return y.new_empty(*y.shape[:-1], width)


@torch.library.custom_op("optipipe::tp_argmax", mutates_args=())
def tp_argmax(value: torch.Tensor, index: torch.Tensor, reducer: str) -> torch.Tensor:
    """Per row, the ``index`` whose ``value`` is largest over the group's ranks (the lowest rank's on
    a tie); ``value`` float32 and ``index`` int64, one per row."""
    return REDUCERS[reducer].argmax(value, index)


@tp_argmax.register_fake
def _(value: torch.Tensor, index: torch.Tensor, reducer: str) -> torch.Tensor:
    return torch.empty_like(index)


def symm_mem_problem(group: Any, device: torch.device) -> str | None:
    """Why symmetric memory cannot serve this group (None: it can)."""
    import torch.distributed as dist

    if device.type != "cuda":
        return f"tensors live on {device.type}, not CUDA"
    if dist.get_backend(group) != "nccl":
        return f"the process group runs {dist.get_backend(group)}, not NCCL"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce"):
        return "this torch has no symm_mem.one_shot_all_reduce"
    here = torch.cuda.current_device()
    peers = [d for d in range(torch.cuda.device_count()) if d != here]
    if dist.get_world_size(group) > 1 and peers and not all(torch.cuda.can_device_access_peer(here, d) for d in peers):
        return "the GPUs cannot access each other's memory (no NVLink/P2P)"
    return None


class AllReduce:
    """Sum over ``group``: one-shot symmetric memory for messages up to ``max_bytes``, else the
    process group's all-reduce. ``mode``: auto (symmetric memory where possible) | symm_mem (refuse
    to fall back) | process_group (NCCL/gloo always)."""

    def __init__(self, group: Any, device: torch.device, mode: str = "auto", max_bytes: int = 1 << 20,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        import torch.distributed as dist

        if mode not in MODES:
            raise ValueError(f"unknown all-reduce mode {mode!r}")
        self.group, self.max_bytes = group, max_bytes
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.fallback = str(dist.get_backend(group))
        self.why_not_symm = symm_mem_problem(group, device) if mode != "process_group" else "asked for"
        if mode == "symm_mem" and self.why_not_symm:
            raise RuntimeError(f"symmetric-memory all-reduce is not possible here: {self.why_not_symm}")
        self.buffer: torch.Tensor | None = None
        self.peer_buffers: torch.Tensor | None = None  # every rank's buffer address, as this process maps it
        self.calls = 0
        self.fuse_norm = True  # FuseAllReduceNorm may fold the add + RMSNorm after this reducer's sums
        self.push_wait = WAIT_IN_TURN  # how the fused kernel waits for its peers (WAITS)
        self.push_width: int | None = None  # the fused kernel's row width (one per reducer: its areas' layout)
        self.push_dtype = dtype  # the fused kernel's messages (the model's dtype): its empty-slot mark
        self.push_calls: torch.Tensor | None = None  # per row: the fused kernel's calls so far (picks the copy)
        if self.why_not_symm is None:
            try:
                self.buffer = self._exchange_buffer(device)
            except RuntimeError as e:  # e.g. a driver without the memory-mapping APIs it needs
                if mode == "symm_mem":
                    raise
                self.why_not_symm = f"symmetric memory failed to set up: {str(e).splitlines()[0][:200]}"
        self.name = f"r{len(REDUCERS)}"
        REDUCERS[self.name] = self

    @property
    def kind(self) -> str:
        """What the small messages (the decode step's) go through."""
        return ONE_SHOT if self.buffer is not None else self.fallback

    def _exchange_buffer(self, device: torch.device) -> torch.Tensor:
        """Two halves of ``max_bytes`` that all ranks can read, exchanged now (a collective: never
        during a capture), then the fused kernel's receive areas: ``PUSH_COPIES`` × ranks ×
        ``max_bytes``, all empty (stages/shard/all_reduce_norm.py). Consecutive reductions use
        alternate halves, so a rank that runs ahead never writes where a slower peer may still be
        reading the previous message."""
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        areas = PUSH_COPIES * self.world * self.max_bytes
        buffer = symm_mem.empty(2 * self.max_bytes + areas, dtype=torch.uint8, device=device)
        bits, empty = EMPTY_BITS.get(self.push_dtype, EMPTY_BITS[torch.bfloat16])
        buffer[2 * self.max_bytes:].view(bits).fill_(empty)
        torch.cuda.synchronize(device)
        handle = symm_mem.rendezvous(buffer, self.group.group_name)
        self.push_calls = torch.zeros(self.max_bytes // 2, dtype=torch.int32, device=device)  # ≥ rows of any message
        dist.barrier(group=self.group)  # every rank's areas are empty before any rank may send
        # each rank's tensor lies at the same offset in its allocation (symmetric)
        offset = buffer.data_ptr() - handle.buffer_ptrs[handle.rank]
        self.peer_buffers = torch.tensor([p + offset for p in handle.buffer_ptrs], dtype=torch.int64, device=device)
        return buffer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.optipipe.tp_all_reduce(x, self.name)

    def _slot(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A view of the shared buffer for one message, or None when the message must take the
        process group (no buffer, or too large). Consecutive messages use alternate halves."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.buffer is None or nbytes > self.max_bytes:
            return None
        start = (self.calls % 2) * self.max_bytes
        self.calls += 1
        return self.buffer[start:start + nbytes].view(dtype).view(shape)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        shared = self._slot(tuple(x.shape), x.dtype)
        if shared is not None:
            # one kernel copies this rank's part in and sums every rank's copy in rank order, so all
            # ranks hold bit-identical results (their greedy choices cannot diverge)
            return torch.ops.symm_mem.one_shot_all_reduce_copy(shared, x.contiguous(), "sum",
                                                               self.group.group_name)
        out = x.contiguous().clone()
        dist.all_reduce(out, group=self.group)
        return out

    def gather_columns(self, y: torch.Tensor, width: int) -> torch.Tensor:
        """Rank r's columns go to block r of (world, rows, chunk), zero elsewhere: the sum over ranks
        is then the concatenation (y + 0 is exact)."""
        import torch.distributed as dist

        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        rows, chunk = y.reshape(-1, y.shape[-1]), -(-width // world)
        blocks = torch.zeros(world, rows.shape[0], chunk, dtype=y.dtype, device=y.device)
        blocks[rank, :, :rows.shape[1]] = rows  # the last rank of an uneven split fills fewer columns
        summed = self.run(blocks)
        full = summed.permute(1, 0, 2).reshape(rows.shape[0], world * chunk)[:, :width].contiguous()
        return full.reshape(*y.shape[:-1], width)

    def argmax(self, value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Every rank's (value, index) pairs meet in one small all-reduce: rank r's go to block r of
        (world, rows, 2), zero elsewhere. float32 holds a bf16/fp16 logit and a vocabulary index
        below 2**24 exactly, so the choice is the one a full-vocabulary argmax makes."""
        import torch.distributed as dist

        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        blocks = torch.zeros(world, value.shape[0], 2, dtype=torch.float32, device=value.device)
        blocks[rank, :, 0], blocks[rank, :, 1] = value, index.float()
        summed = self.run(blocks)
        best = summed[:, :, 0].argmax(0, keepdim=True)  # the first rank holding the maximum: lower indices
        return summed[:, :, 1].gather(0, best)[0].long()


def self_test(reduce: AllReduce, device: torch.device, rank: int, world: int) -> bool:
    """True when every rank's sum of (rank + 1) over a decode-sized message is exact (both paths)."""
    ok = True
    for n in (4096, 4096, reduce.max_bytes // 2 + 1):  # both halves of the buffer, and over it (the fallback)
        got = reduce(torch.full((n,), float(rank + 1), device=device, dtype=torch.bfloat16))
        ok &= bool((got == world * (world + 1) / 2).all())
    return ok
