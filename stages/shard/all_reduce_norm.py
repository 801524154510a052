"""The tensor-parallel all-reduce, the residual add after it and the RMSNorm after that, as one kernel.

Every decoder layer of a Llama-family model all-reduces twice (attention output, MLP output), and
each time the sum is added to the residual stream and normalized for what follows. Unfused, that is
two kernels per all-reduce: the one-shot reduction (~9 µs on H200 at batch 32, mostly the
handshake between the GPUs) and a small add + RMSNorm kernel (~2–4 µs there, latency-bound) —
64 of each per token for 32 layers, paid only under tensor parallel. Here one Triton kernel, one
program per row, writes its row of the partial sum straight into every peer's memory and waits for
theirs to arrive in its own — no handshake, one trip over NVLink (``_triton_kernel``) — sums every
rank's row in rank order (so all ranks hold bit-identical residuals), adds the residual and
normalizes.

``FuseAllReduceNorm`` (an inductor post-grad pass given in the decode step's compile options) finds
``tp_all_reduce → add(residual) → RMSNorm`` in the compiled graph and puts the fused op in its place;
the model's code is not touched. Where the kernel cannot run (CPU/gloo, no peer memory, a message
over the buffer, a dtype other than the model's bf16/fp16/fp32, no Triton) the op computes the same
ops one after another.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from stages import kernel_launch
from stages.shard.all_reduce import EMPTY_BITS, PUSH_COPIES, REDUCERS, WAIT_TOGETHER, AllReduce

aten, prims = torch.ops.aten, torch.ops.prims


@torch.library.custom_op("optipipe::tp_all_reduce_add_rms_norm", mutates_args=())
def tp_all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                               upcast: bool, reducer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + Σ_ranks x`` and ``RMSNorm(h) · weight`` as the model computes it (in float32
    when ``upcast``, cast back to h's dtype before the weight); returns (h, normed)."""
    return _run(reducer, x, residual, weight, eps, upcast)


@tp_all_reduce_add_rms_norm.register_fake
def _(x, residual, weight, eps, upcast, reducer):
    out = torch.empty_like(residual, memory_format=torch.contiguous_format)
    normed = residual.new_empty(residual.shape, dtype=torch.result_type(weight, residual))
    return out, normed


def add_rms_norm(summed: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused reference: the ops of transformers' RMSNorm after the residual add, in its order."""
    h = residual + summed
    c = h.float() if upcast else h
    normed = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    return h, weight * normed.to(h.dtype)


class FuseAllReduceNorm(CustomGraphPass):
    """inductor post-grad pass: ``tp_all_reduce(x) → add(residual, ·) → RMSNorm`` becomes one
    ``tp_all_reduce_add_rms_norm``. ``fused`` counts the rewrites of the last graph it saw."""

    def __init__(self) -> None:
        self.fused = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.fused = 0
        for node in list(graph.nodes):
            if (node.op == "call_function" and node.target is torch.ops.optipipe.tp_all_reduce.default
                    and REDUCERS[node.args[1]].fuse_norm):
                self.fused += _fuse(graph, node)

    def uuid(self) -> str:
        return "optipipe.FuseAllReduceNorm.1"


def _only_user(node: torch.fx.Node, target: Any, *, among: bool = False) -> torch.fx.Node | None:
    """The user of ``node`` calling ``target`` (its only user unless ``among``), else None."""
    users = [u for u in node.users if u.op == "call_function" and u.target is target]
    if len(users) != 1 or (not among and len(node.users) != 1):
        return None
    return users[0]


def _val(node: Any) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _match(ar: torch.fx.Node) -> dict[str, Any] | None:
    """The residual add and RMSNorm after ``ar``, exactly as transformers' RMSNorm traces, or None."""
    add = _only_user(ar, aten.add.Tensor)
    if add is None or len(add.args) != 2 or add.kwargs:
        return None
    residual = add.args[0] if add.args[1] is ar else add.args[1]
    h, r = _val(add), _val(residual)
    if r is None or h is None or r.shape != h.shape or r.dtype != h.dtype or _val(ar).shape != h.shape:
        return None
    c = _only_user(add, prims.convert_element_type.default, among=True)
    upcast = c is not None and c.args[1] == torch.float32
    c = c if upcast else add
    square = _only_user(c, aten.pow.Tensor_Scalar, among=True)
    if square is None or square.args[1] != 2:
        return None
    mean = _only_user(square, aten.mean.dim)
    if mean is None:
        return None
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim")
    if list(mean.args[1]) not in ([-1], [h.dim() - 1]) or not keepdim or mean.kwargs.get("dtype"):
        return None
    plus_eps = _only_user(mean, aten.add.Tensor)
    if plus_eps is None or not isinstance(plus_eps.args[1], (int, float)):
        return None
    rsqrt = _only_user(plus_eps, aten.rsqrt.default)
    scaled = rsqrt and _only_user(rsqrt, aten.mul.Tensor)
    if scaled is None or set(scaled.args) != {c, rsqrt} or (upcast and len(c.users) != 2):
        return None
    down = scaled
    if upcast:
        down = _only_user(scaled, prims.convert_element_type.default)
        if down is None or down.args[1] != h.dtype:
            return None
    out = _only_user(down, aten.mul.Tensor)
    if out is None:
        return None
    weight = out.args[0] if out.args[1] is down else out.args[1]
    w = _val(weight)
    if w is None or tuple(w.shape) != (h.shape[-1],):
        return None
    chain = [out, down, scaled, rsqrt, plus_eps, mean, square] + ([c] if upcast else [])
    return {"add": add, "residual": residual, "weight": weight, "eps": float(plus_eps.args[1]),
            "upcast": upcast, "out": out, "chain": list(dict.fromkeys(chain))}


def _fuse(graph: torch.fx.Graph, ar: torch.fx.Node) -> int:
    m = _match(ar)
    if m is None:
        return 0
    x, reducer = ar.args
    args = (x, m["residual"], m["weight"], m["eps"], m["upcast"], reducer)
    with graph.inserting_before(m["add"]):
        fused = graph.call_function(torch.ops.optipipe.tp_all_reduce_add_rms_norm.default, args)
        h = graph.call_function(operator.getitem, (fused, 0))
        normed = graph.call_function(operator.getitem, (fused, 1))
    fake = (_val(m["add"]), _val(m["out"]))
    fused.meta["val"] = fake
    h.meta["val"], normed.meta["val"] = fake
    m["out"].replace_all_uses_with(normed)
    m["add"].replace_all_uses_with(h)
    for node in [*m["chain"], m["add"], ar]:
        graph.erase_node(node)
    return 1


# how the fused op ran since the last reset (the run's tag): "push_kernel", "push_kernel_together" or "unfused"
RUNS: dict[str, int] = {}
_MAX_WIDTH = 16384  # one program holds a row in registers


def _kernel_fits(reduce: AllReduce, x: torch.Tensor, residual: torch.Tensor, upcast: bool) -> bool:
    """Whether the fused kernel can take this message (else the unfused ops run)."""
    width = x.shape[-1]
    if reduce.buffer is None or not x.is_cuda or residual.dtype != x.dtype:
        return False
    if x.dtype != reduce.push_dtype or x.dtype not in EMPTY_BITS:
        return False  # the receive areas are marked empty in the model's dtype
    if not (upcast or x.dtype == torch.float32) or width > _MAX_WIDTH or x.numel() * x.element_size() > reduce.max_bytes:
        return False
    # the receive areas are laid out by row width: one width per reducer (the model's hidden size)
    return reduce.push_width in (None, width) and _triton_kernel() is not None


def _run(reducer: str, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
         upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    reduce = REDUCERS[reducer]
    if not _kernel_fits(reduce, x, residual, upcast):
        RUNS["unfused"] = RUNS.get("unfused", 0) + 1
        return add_rms_norm(reduce.run(x), residual, weight, eps, upcast)
    together = reduce.push_wait == WAIT_TOGETHER
    kind = "push_kernel_together" if together else "push_kernel"
    RUNS[kind] = RUNS.get(kind, 0) + 1
    width = x.shape[-1]
    rows = x.numel() // width
    reduce.push_width = width
    h = torch.empty(residual.shape, dtype=residual.dtype, device=x.device)
    normed = torch.empty(residual.shape, dtype=torch.result_type(weight, residual), device=x.device)
    block = 1 << (width - 1).bit_length()
    sources = 1 << (reduce.world - 1).bit_length()  # the together-kernel's tile of every rank's row
    pdl = kernel_launch.dependent(x.device)
    _triton_kernel()[(rows,)](
        x.contiguous(), residual.contiguous(), weight.contiguous(), h, normed, reduce.peer_buffers,
        2 * reduce.max_bytes, reduce.max_bytes // x.element_size(), reduce.push_calls, eps, N=width,
        RANK=reduce.rank, WORLD=reduce.world, COPIES=PUSH_COPIES, EMPTY=EMPTY_BITS[x.dtype][1],
        WIDE=x.element_size() == 4, BLOCK=block, TOGETHER=together, WP=sources, PDL=pdl,
        num_warps=min(16, max(4, block * (sources if together else 1) // 512)),
        **kernel_launch.options(pdl))
    return h, normed


_KERNEL: list[Any] = []


def _triton_kernel() -> Any:
    """The Triton kernel (built on first use; None where Triton is missing, e.g. CPU-only torch).

    No flags and no handshake: each program pushes its row of the partial sum into a receive area of
    every rank (its own included), then reads its own areas until no slot is empty — a slot is
    empty while it holds -0.0, which no sender sends (it sends +0.0 instead: the same number) — sums
    them in rank order, and empties what it read. The areas rotate over three copies per row (the
    program's own call count picks one), so a peer one call ahead writes where nobody reads yet, and
    a copy is written again only after every rank emptied it: a rank can be at most one call ahead,
    since each call needs every peer's row of the same call."""
    if _KERNEL:
        return _KERNEL[0]
    try:
        import triton
        import triton.language as tl
    except ImportError:
        _KERNEL.append(None)
        return None

    @triton.jit
    def push_all_reduce_add_rms_norm(x_ptr, res_ptr, w_ptr, h_ptr, y_ptr, peers_ptr, areas, area_elems,
                                     calls_ptr, eps, N: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                                     COPIES: tl.constexpr, EMPTY: tl.constexpr, WIDE: tl.constexpr,
                                     BLOCK: tl.constexpr, TOGETHER: tl.constexpr = False, WP: tl.constexpr = 1,
                                     PDL: tl.constexpr = False):
        if PDL:  # launched as a programmatic dependent (stages/kernel_launch.py): the partial sum is ready after this
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < N
        call = tl.load(calls_ptr + row)
        copy = call % COPIES
        dtype = x_ptr.dtype.element_ty
        bits = tl.int32 if WIDE else tl.int16  # an integer as wide as dtype, to compare with EMPTY
        x = tl.load(x_ptr + row * N + cols, mask=inside, other=0.0)
        x = tl.where(x.to(bits, bitcast=True) == EMPTY, tl.zeros_like(x), x)  # -0.0 marks an empty slot: send +0.0
        # this row into area (copy, RANK) of every rank
        at = (copy * WORLD + RANK) * area_elems + row * N + cols
        for peer in tl.static_range(WORLD):
            base = (tl.load(peers_ptr + peer) + areas).to(tl.pointer_type(dtype))
            tl.store(base + at, x, mask=inside)
        if PDL:  # pushed: the next kernel may launch now and wait for this one while the peers' rows arrive
            tl.extra.cuda.gdc_launch_dependents()
        # every rank's row from this rank's areas, in rank order (all ranks add the same bits)
        mine = (tl.load(peers_ptr + RANK) + areas).to(tl.pointer_type(dtype))
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        if TOGETHER:
            # the residual and weight before the wait, and every peer's row in one load per poll (one
            # memory round trip, not one per peer); rank order kept by adding one source at a time
            residual = tl.load(res_ptr + row * N + cols, mask=inside, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            srcs = tl.arange(0, WP)
            slots = mine + (copy * WORLD + srcs[:, None]) * area_elems + row * N + cols[None, :]
            held = (srcs[:, None] < WORLD) & inside[None, :]
            got = tl.load(slots, mask=held, other=1.0, volatile=True)
            while tl.max(tl.max((got.to(bits, bitcast=True) == EMPTY).to(tl.int32), axis=1), axis=0) > 0:
                got = tl.load(slots, mask=held, other=1.0, volatile=True)
            for src in tl.static_range(WORLD):  # x + 0.0 is exact: each sum is that source's row
                acc += tl.sum(tl.where(srcs[:, None] == src, got.to(tl.float32), 0.0), axis=0)
            tl.store(slots, tl.full([WP, BLOCK], EMPTY, bits).to(dtype, bitcast=True), mask=held)
        else:
            for src in tl.static_range(WORLD):
                slot = mine + (copy * WORLD + src) * area_elems + row * N + cols
                got = tl.load(slot, mask=inside, other=1.0, volatile=True)
                while tl.max((got.to(bits, bitcast=True) == EMPTY).to(tl.int32), axis=0) > 0:
                    got = tl.load(slot, mask=inside, other=1.0, volatile=True)
                acc += got.to(tl.float32)
                tl.store(slot, tl.full([BLOCK], EMPTY, bits).to(dtype, bitcast=True), mask=inside)
            residual = tl.load(res_ptr + row * N + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(calls_ptr + row, call + 1)
        # the all-reduce's output as it would be rounded, the residual add, RMSNorm in float32
        h = (residual + acc.to(dtype).to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * N + cols, h, mask=inside)
        c = tl.where(inside, h.to(tl.float32), 0.0)  # lanes past the row's end stay out of the mean
        normed = (c * tl.rsqrt(tl.sum(c * c, axis=0) / N + eps)).to(h_ptr.dtype.element_ty)
        if not TOGETHER:
            w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * N + cols, (w * normed.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=inside)

    _KERNEL.append(push_all_reduce_add_rms_norm)
    return push_all_reduce_add_rms_norm
