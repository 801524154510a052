"""The fast decode engine: a static KV cache and one compiled decode step, replayed per token.

Why not ``model.generate``: its Python loop runs stopping criteria, logits processors and cache
bookkeeping on the host between tokens, and checks for EOS with a device→host copy every step, so
at batch 1 the GPU waits for the CPU. Here a decode step is one function — forward, token choice,
position update, finished-row bookkeeping — compiled once (``reduce-overhead`` captures it as a
CUDA graph) and replayed; the host only asks "all finished?" every ``stop_check_every`` tokens.

Greedy output equals ``generate`` token for token: same positions (from the attention mask, as
transformers computes them), same padding of finished rows, same trimming at the end.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipeline import measure
from stages import kernel_launch
from stages.generate.clock import StepClock
from stages.generate.joined_projections import MergeRepeatedOps, join as join_projections
from stages.generate.step_state import StepState
from stages.attention.gqa_decode import NAME as GQA_DECODE_ATTENTION, SDPA as GQA_SDPA, GqaDecodeAttention
from stages.shard import agreed_tuning, all_reduce_norm
from stages.shard.tp_layers import split_head


GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that capture CUDA graphs
PREFILL_GRAPH_MODE = "reduce-overhead"  # a bucketed prefill's compile mode (a CUDA graph, no autotuning)


@dataclass
class Sampling:
    """Token choice inside the compiled step. ``do_sample=False``: greedy (argmax)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0


def choose(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Next token per row. Sampling draws with the exponential trick (argmax of p/E, E ~ Exp(1)),
    which needs no host-side multinomial and so stays inside a CUDA graph."""
    if not s.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > s.top_p  # keep the smallest set reaching top_p
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), 0.0)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


def step_compile_options(mode: str, coordinate_descent: bool, merge: MergeRepeatedOps | None = None,
                         fuse: all_reduce_norm.FuseAllReduceNorm | None = None,
                         realize_opcount: int | None = None, pdl: bool = False) -> dict[str, Any]:
    """inductor options for the decode step: ``mode``'s own, plus coordinate-descent tuning when asked
    (with inductor's caches off while tensor-parallel ranks agree on it: stages/shard/agreed_tuning.py),
    the pass that merges joined projections and the one that fuses all-reduce + add + RMSNorm when given,
    and inductor's threshold for computing a pointwise expression once rather than in its consumers.

    That threshold matters at batch 1: each matmul is a reduction kernel per output row, and a
    producer inlined into it (SwiGLU's silu(gate)·up before down_proj) is recomputed for every row.
    Lowered from inductor's 30 ops to 4: bf16 batch 1 decoded 212.8 tok/s against 185.6 (Llama-3-8B
    shape, two H200s of one host at once), batch 32 5414.8 against 5326.2; at 2, more small kernels
    made it slower than at 4 (BENCHMARKS.md, "float8 rows, inductor's realize threshold").

    At batch 1 every projection is a matrix-vector product (M = 1). cuBLAS runs those below the
    memory bandwidth they could reach; with coordinate-descent tuning on, inductor rewrites an M = 1
    matmul as a multiply-and-sum reduction, fuses it with its neighbours and tunes its block sizes
    on the card — the setting gpt-fast compiles with. (``torch.compile`` takes a mode or options,
    not both: the mode's options are spelled out here.)

    ``pdl``: a decode step is hundreds of small kernels (about nine a layer), each a few µs, and each
    waits for the one before to end before it even starts. With programmatic dependent launch
    (Hopper and newer; inductor's ``triton.enable_pdl``) a kernel is launched while its predecessor
    runs, does its setup, and waits inside for the data it reads (``gdc_wait``)."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode))
    if merge is not None:  # joined projections: one matmul per group (stages/generate/joined_projections.py)
        options["post_grad_custom_pre_pass"] = merge
    if fuse is not None:  # tensor parallel: stages/shard/all_reduce_norm.py (no all-reduce: nothing to do)
        options["post_grad_custom_post_pass"] = fuse
    if realize_opcount is not None:
        options["realize_opcount_threshold"] = realize_opcount
    if pdl:
        options["triton.enable_pdl"] = True
    if coordinate_descent:
        options["coordinate_descent_tuning"] = True
        if agreed_tuning.active():
            options.update(agreed_tuning.COMPILE_OPTIONS)
    return options


class FastDecoder:
    """Owns one static cache sized for (batch, prompt + new tokens) and the compiled step."""

    def __init__(self, model: Any, compile_mode: str | None = "reduce-overhead",
                 stop_check_every: int = 16, sampling: Sampling | None = None,
                 gqa_attention: bool = True, compile_prefill: bool = False,
                 coordinate_descent: bool = True, fuse_projections: bool = False,
                 realize_opcount: int | None = None, decode_kernel: str = GQA_SDPA, pdl: bool = False,
                 levers: str = "as set", prefill_bucket: int | None = None) -> None:
        self.model, self.compile_mode, self.gqa_attention = model, compile_mode, gqa_attention
        self.decode_kernel, self.pdl = decode_kernel, pdl
        self.levers = levers  # how decode_kernel and pdl were chosen (auto_levers.py; a tag)
        self.coordinate_descent, self.realize_opcount = coordinate_descent, realize_opcount
        # q/k/v and gate/up as one matmul each in compiled code (eager calls run them apart, as before)
        self.fuse_projections = fuse_projections
        self.joined = join_projections(model) if fuse_projections else []
        self.merge = MergeRepeatedOps() if self.joined else None
        # The prefill is one forward per generation; eager it launches every kernel from Python.
        # Compiled its small ops fuse; without a CUDA graph (prompt lengths vary: dynamic shapes after
        # the first recompile) it still launches each kernel from the host. With ``prefill_bucket``
        # prompts are left-padded to a multiple of that many tokens and each padded length (and batch)
        # compiles once into a CUDA graph of its own. Off by default: its time to first token did not
        # yet halve run after run (BENCHMARKS.md).
        self.compile_prefill = compile_prefill
        self.prefill_bucket = prefill_bucket if compile_prefill else None
        self._prefill_forward = self._forward
        if compile_prefill:
            from torch._inductor import list_mode_options

            prefill_options = dict(list_mode_options(PREFILL_GRAPH_MODE)) if self.prefill_bucket else {}
            if self.merge:
                prefill_options["post_grad_custom_pre_pass"] = self.merge
            self._prefill_forward = torch.compile(self._forward, dynamic=False if self.prefill_bucket else None,
                                                  fullgraph=True, options=prefill_options or None)
        self.prefill_graph_skips: int | None = None  # CUDA graphs inductor declined for the prefill
        self.stop_check_every = max(1, stop_check_every)
        self.sampling = sampling or Sampling()
        # tensor parallel, greedy: each rank picks from its own slice of the vocabulary
        self.split_head = None if self.sampling.do_sample else split_head(model)
        self.cache, self.cache_shape = None, None
        self.state: StepState | None = None  # the step's inputs, at fixed addresses (step_state.py)
        self._step: Callable | None = None
        # CUDA graphs inductor declined for the step when it compiled (None: not compiled yet)
        self.graph_skips: int | None = None
        # transformers renamed past_key_values to cache (5.2x); speak whichever this version takes
        params = inspect.signature(type(model).forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def _ensure_cache(self, batch: int, length: int) -> None:
        from transformers import StaticCache

        if self.cache_shape == (batch, length):
            self.cache.reset()  # same buffers: the captured graph keeps pointing at them
            return
        self.cache = StaticCache(config=self.model.config, max_cache_len=length)
        self.cache_shape = (batch, length)
        self.state = None
        self._step = None  # new buffers: capture again

    def _ensure_state(self, batch: int, length: int, mask_dtype: torch.dtype, device: torch.device) -> StepState:
        if self.state is None or not self.state.fits(batch, length, mask_dtype, device):
            self.state = StepState.allocate(batch, length, mask_dtype, device)
            self._step = None  # the step is captured reading these addresses
        return self.state

    def _decode_step(self, token, position, cache_position, mask, done, banned, pad, eos, tokens) -> None:
        """One token for every row: forward, choice, finished-row bookkeeping, next positions — all
        written in place into the step's state (``StepState.tensors()``), so a replay needs no copies."""
        logits = self.model(input_ids=token, position_ids=position, cache_position=cache_position,
                            attention_mask=mask, use_cache=True, **{self.cache_kw: self.cache}).logits[:, -1]
        if self.split_head is not None:  # logits are this rank's columns (local_logits is open)
            nxt = self.split_head.greedy(logits, banned)
        else:
            nxt = choose(logits.masked_fill(banned, float("-inf")), self.sampling)
        nxt = torch.where(done, pad, nxt)  # rows that met EOS keep emitting pad, as generate does
        done.logical_or_(torch.isin(nxt, eos))
        token.copy_(nxt[:, None])
        position.add_(1)
        cache_position.add_(1)
        tokens.index_copy_(1, cache_position, nxt[:, None])  # the token's own column

    def _compiled_step(self) -> Callable:
        if self._step is None:
            if self.compile_mode is None:
                self._step = self._decode_step
            else:
                options = step_compile_options(self.compile_mode, self.coordinate_descent, self.merge,
                                               all_reduce_norm.FuseAllReduceNorm(), self.realize_opcount, self.pdl)
                all_reduce_norm.RUNS.clear()  # from here on: how this step's fused ops ran (the tag)
                self._step = agreed_tuning.scoped(torch.compile(self._decode_step, fullgraph=True, dynamic=False,
                                                                options=options))
        return self._step

    def _prefill(self, input_ids, attention_mask, mask):
        """The prompt into the cache (one call per generation) and its mask into ``mask``.
        Returns the last logits and the prompt's positions."""
        prompt = input_ids.shape[1]
        # Positions as transformers derives them from a left-padded mask; the mask spans the whole
        # cache (future slots 1: causality hides them) so its shape never changes between steps.
        position = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        mask[:, :prompt].copy_(attention_mask)
        mask[:, prompt:].fill_(1)
        cache_position = torch.arange(prompt, device=input_ids.device)
        if self.compile_prefill and not self._cache_allocated():
            # transformers' static cache allocates its buffers in its first update; compiled against
            # a cache without them, the prefill would compile again on the next call (a timed run).
            # One eager prefill allocates them, the cache is cleared, and the compiled one follows.
            self._forward(input_ids, mask, position, cache_position)
            self.cache.reset()
        if not self.prefill_bucket:
            return self._prefill_forward(input_ids, mask, position, cache_position), position
        torch.compiler.cudagraph_mark_step_begin()
        skips = graph_skips_so_far()
        # a copy: the graph's output buffer is overwritten by the steps that follow
        logits = self._prefill_forward(input_ids, mask, position, cache_position).clone()
        self.prefill_graph_skips = (self.prefill_graph_skips or 0) + graph_skips_so_far() - skips
        return logits, position

    def _cache_allocated(self) -> bool:
        return all(getattr(layer, "is_initialized", True) for layer in getattr(self.cache, "layers", ()))

    def _forward(self, input_ids, mask, position, cache_position):
        """The prompt's forward into the cache; the last position's logits."""
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=position,
                          cache_position=cache_position, use_cache=True, logits_to_keep=1,
                          **{self.cache_kw: self.cache}).logits[:, -1]

    def attention(self):
        """The attention the engine runs under: grouped-query decode attention unless turned off."""
        return GqaDecodeAttention(self.model, self.decode_kernel) if self.gqa_attention else nullcontext()

    def decode_attention(self) -> str:
        """The attention implementation the decode steps run with (for the run's tags)."""
        gqa = self.gqa_attention and GqaDecodeAttention(self.model).active
        if not gqa:
            return str(self.model.config._attn_implementation)
        return GQA_DECODE_ATTENTION + ("" if self.decode_kernel == GQA_SDPA else f" + {self.decode_kernel} kernel")

    def fused_projections(self) -> str:
        """Which projection groups run as one matmul in the compiled steps (for the run's tags)."""
        if self.joined:
            return "joined " + ", ".join(self.joined)
        return "off (asked for, but no plain q/k/v or gate/up linear layers)" if self.fuse_projections else "off"

    def token_choice(self) -> str:
        """How the decode steps choose tokens (for the run's tags)."""
        if self.sampling.do_sample:
            return "sampled"
        return "vocab_parallel_argmax" if self.split_head is not None else "argmax"

    def all_reduce_norm(self) -> str:
        """How the compiled step's all-reduces met the residual add and RMSNorm after them (for the
        run's tags): push_kernel (one fused kernel, stages/shard/all_reduce_norm.py), unfused (the fused
        op computed them one after another: no peer memory), or off (no fused op ran: no TP, eager,
        shard.fuse_norm=false)."""
        if self.compile_mode is None or not all_reduce_norm.RUNS:
            return "off"
        return "+".join(sorted(all_reduce_norm.RUNS))

    def launches_dependent(self) -> bool:
        """Whether the compiled step's kernels, ours included (stages/kernel_launch.py), are asked to
        launch as programmatic dependents."""
        return self.pdl and self.compile_mode is not None

    def launch(self) -> str:
        """How the compiled step's kernels launch (for the run's tags): programmatic_dependent (inductor
        emits it on a Hopper or newer GPU), or stream_order (each starts when the last has ended)."""
        if not self.launches_dependent():
            return "stream_order"
        if not kernel_launch.capable(measure.parameter_device(self.model)):
            return "stream_order (programmatic dependent launch needs compute capability 9.0)"
        return "programmatic_dependent"

    def cuda_graphs(self) -> str:
        """Whether the compiled step runs as a CUDA graph, as its mode asks (for the run's tags): a step
        that inductor could not capture still runs, kernel launch by launch, and much slower at batch 1."""
        if self.compile_mode not in GRAPH_MODES:
            return f"not asked (compile mode {self.compile_mode})"
        device = measure.parameter_device(self.model)
        if device.type != "cuda":
            return f"none ({device.type}: CUDA graphs are a CUDA feature)"
        if self.graph_skips is None:
            return "not compiled yet"
        if self.graph_skips:
            return (f"NOT CAPTURED ({self.graph_skips} graph(s) skipped): the step runs kernel by kernel; "
                    "TORCH_LOGS=cudagraphs says why")
        return "captured"

    def prefill(self) -> str:
        """How the prompt's forward runs (for the run's tags)."""
        if not self.compile_prefill:
            return "eager"
        if not self.prefill_bucket:
            return "compiled (no CUDA graph)"
        padded = f"prompts left-padded to a multiple of {self.prefill_bucket} tokens"
        device = measure.parameter_device(self.model)
        if device.type != "cuda":
            return f"compiled, {padded} (no CUDA graph on {device.type})"
        if self.prefill_graph_skips is None:
            return f"compiled, {padded}: not run yet"
        if self.prefill_graph_skips:
            return (f"compiled, {padded}: CUDA graph NOT CAPTURED ({self.prefill_graph_skips} skipped; "
                    "TORCH_LOGS=cudagraphs says why)")
        return f"compiled, {padded}: CUDA graph per padded length"

    def realize_threshold(self) -> str:
        """inductor's realize threshold in the compiled step (for the run's tags)."""
        if self.compile_mode is None:
            return "eager"
        return "inductor default" if self.realize_opcount is None else str(self.realize_opcount)

    def kernel_tuning(self) -> str:
        """How the decode step's kernels were chosen (for the run's tags)."""
        if self.compile_mode is None:
            return "eager"
        if not step_compile_options(self.compile_mode, self.coordinate_descent).get("coordinate_descent_tuning"):
            return "inductor_default"
        return f"coordinate_descent_{agreed_tuning.AGREED}" if agreed_tuning.active() else "coordinate_descent"

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_token_ids: list[int], pad_token_id: int, min_new_tokens: int = 0,
                 clock: StepClock | None = None) -> torch.Tensor:
        """Prompt + new tokens, like ``generate``'s output (rows padded after their EOS)."""
        with self.attention(), kernel_launch.dependent_launch(self.launches_dependent()):
            return self._generate(input_ids, attention_mask, max_new_tokens, eos_token_ids, pad_token_id,
                                  min_new_tokens, clock)

    def _generate(self, input_ids, attention_mask, max_new_tokens, eos_token_ids, pad_token_id,
                  min_new_tokens, clock) -> torch.Tensor:
        given = input_ids
        if self.prefill_bucket:  # padding attends to nothing and moves no position: generate's tokens
            input_ids, attention_mask = pad_left(input_ids, attention_mask, self.prefill_bucket, pad_token_id)
        (batch, prompt), device = input_ids.shape, input_ids.device
        self._ensure_cache(batch, prompt + max_new_tokens)
        s = self._ensure_state(batch, prompt + max_new_tokens, attention_mask.dtype, device)
        logits, position = self._prefill(input_ids, attention_mask, s.mask)
        # EOS is banned until min_new_tokens are out, as transformers' MinNewTokens processor does.
        s.set_stops(logits.shape[-1], eos_token_ids, pad_token_id, ban_eos=min_new_tokens > 0)
        token = choose(logits.masked_fill(s.banned, float("-inf")), self.sampling)
        if clock is not None:
            clock(input_ids, logits)
        s.done.copy_(torch.isin(token, s.eos))
        s.token.copy_(token[:, None])
        s.position.copy_(position[:, -1:] + 1)
        s.cache_position.fill_(prompt)
        s.tokens[:, prompt] = token
        fresh = self._step is None and self.compile_mode is not None  # this call compiles the step
        step, produced = self._compiled_step(), 1
        with self.split_head.local_logits() if self.split_head else nullcontext():
            while produced < max_new_tokens:
                if produced == min_new_tokens:
                    s.banned.zero_()  # EOS allowed from this token on
                if self.compile_mode in GRAPH_MODES:
                    torch.compiler.cudagraph_mark_step_begin()
                skips = graph_skips_so_far() if fresh else 0
                step(*s.tensors())
                if fresh:  # inductor decides at compile time whether the step can be a CUDA graph
                    self.graph_skips, fresh = graph_skips_so_far() - skips, False
                produced += 1
                if clock is not None:
                    clock(input_ids, logits)
                if stop_check_due(produced, min_new_tokens, max_new_tokens, self.stop_check_every) and bool(s.done.all()):
                    break  # one device→host read per stop_check_every tokens, not per token
        # a copy: the buffer is the next call's
        return torch.cat([given, trim_finished(s.tokens[:, prompt:prompt + produced].clone(), s.eos)], dim=1)


def pad_left(input_ids: torch.Tensor, attention_mask: torch.Tensor, bucket: int,
             pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch left-padded to the next multiple of ``bucket`` tokens (masked out), so prompts of
    nearby lengths share one compiled prefill and its CUDA graph."""
    extra = -input_ids.shape[1] % bucket
    if not extra:
        return input_ids, attention_mask
    return (torch.nn.functional.pad(input_ids, (extra, 0), value=pad_token_id),
            torch.nn.functional.pad(attention_mask, (extra, 0), value=0))


def graph_skips_so_far() -> int:
    """How many compiled graphs inductor has run without the CUDA graph their mode asked for, in
    this process (a mutated input, a CPU tensor, dynamic shapes…; ``TORCH_LOGS=cudagraphs`` says why)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def stop_check_due(produced: int, min_new_tokens: int, max_new_tokens: int, every: int) -> bool:
    """Whether to read "has every row finished?" from the device after ``produced`` tokens: every
    ``every`` tokens, never while EOS is still banned (fewer than ``min_new_tokens``: no row can have
    finished) and not after the last token. The read waits for the GPU to drain; the step after it
    starts only when the host has queued it, so in a benchmark (min_new_tokens = max_new_tokens) each
    read made a slow step."""
    return min_new_tokens <= produced < max_new_tokens and produced % every == 0


def trim_finished(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Cut where ``generate`` stops: right after the last row to finish emitted its first EOS."""
    hit = torch.isin(tokens, eos)
    if not bool(hit.any(-1).all()):
        return tokens  # some row never finished: generate ran to max_new_tokens
    return tokens[:, :int(hit.int().argmax(-1).max()) + 1]
