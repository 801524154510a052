"""The generate stage: runs a decode workload with warm-up and repeats and reports its timing."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch
from rich.progress import Progress

from pipeline import measure, quiet_timing, roofline
from pipeline.contract import (MEAN, REPLICA_SUM, WORST, BaseStage, Problem, RunContext, StageError, StageResult,
                               across, workload_context)
from stages.generate import engines, gpu_clocks
from stages.generate import prompts as P
from stages.generate.clock import StepClock, Timing, TimingSummary, noise
from stages.settings import GenerateConfig


def eos_ids(model: Any) -> list[int]:
    """The ids that end a sequence, as generate reads them (generation config first); [] if none."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def compiled_graphs() -> int:
    """Graphs torch.compile has produced so far in this process (to spot recompiles while timed)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def roofline_metrics(model: Any, metrics: dict[str, float], devices: list[int], tp: int = 1) -> dict[str, float]:
    """Measured bandwidth of the card, bytes per decode step, and MBU (CUDA only). Under tensor
    parallel over ``tp`` ranks each rank holds 1/tp of the KV heads (its weights are counted as held)."""
    bandwidth = roofline.copy_bandwidth_bytes_per_s(f"cuda:{devices[0]}")
    kv_dtype_bytes = 2 if model.dtype in (torch.float16, torch.bfloat16) else 4
    step_bytes = roofline.decode_step_bytes(measure.decode_weight_bytes(model), model.config,
                                            int(metrics["batch_size"]), int(metrics["prompt_tokens"]),
                                            int(metrics["new_tokens"]), kv_dtype_bytes / tp)
    step_s = metrics["batch_size"] / metrics["decode_tokens_per_s"]
    return {"bandwidth_gb_per_s": bandwidth / 1e9, "decode_step_bytes": step_bytes,
            "mbu": roofline.mbu(step_bytes, step_s, bandwidth),
            "floor_tokens_per_s": metrics["batch_size"] * bandwidth / step_bytes}


# what the clock and the roofline measure; anything else (settings, shares of a profile) is alike on every rank
ACROSS_RANKS_OF_GENERATE = {
    **across(REPLICA_SUM, ["decode_tokens_per_s", "e2e_tokens_per_s", "floor_tokens_per_s"]),
    **across(WORST, ["ttft_ms_p50", "ttft_ms_p90", "itl_ms_p50", "itl_ms_p90", "warmup_seconds", "decode_step_bytes"]),
    **across(MEAN, ["mbu", "bandwidth_gb_per_s", "gpu_sm_clock_mhz_p50", "gpu_sm_clock_mhz_min", "gpu_mem_clock_mhz_p50",
                    "gpu_mem_clock_mhz_min"]),
    **across(WORST, ["gpu_slowdown_share"])}


def decode_text(metrics: dict[str, float]) -> str:
    if "decode_tokens_per_s" not in metrics:
        return "decode n/a (1 new token)"
    return f"{metrics['decode_tokens_per_s']:.1f} tok/s decode"


def split_devices(ctx: RunContext) -> bool:
    """Whether the job leased its GPUs beside other jobs (a local launcher's config has no such key)."""
    launcher = ctx.cfg.get("launcher") if ctx.cfg is not None else None
    return bool(launcher is not None and launcher.get("split_devices", False))


class Generate(BaseStage):
    name: ClassVar[str] = "generate"
    Config: ClassVar[type] = GenerateConfig

    def problems(self, root: Any) -> list[Problem]:
        c, out = self.cfg, []
        for key, value, low in (("batch_size", c.batch_size, 1), ("max_new_tokens", c.max_new_tokens, 1),
                                ("repeats", c.repeats, 1), ("warmup", c.warmup, 0),
                                ("stop_check_every", c.stop_check_every, 1)):
            if value < low:
                out.append(Problem(f"generate.{key}", f"must be ≥ {low}, got {value}",
                                   f"generate.{key}={max(low, 1)}"))
        if c.prompt_tokens is not None and c.prompt_tokens < 1:
            out.append(Problem("generate.prompt_tokens", f"must be ≥ 1 or null, got {c.prompt_tokens}",
                               "generate.prompt_tokens=128"))
        if c.chat_template not in ("auto", "on", "off"):
            out.append(Problem("generate.chat_template", f"unknown mode {c.chat_template!r}",
                               "generate.chat_template=auto|on|off"))
        if not 0 < c.top_p <= 1:
            out.append(Problem("generate.top_p", f"must be in (0, 1], got {c.top_p}",
                               "generate.top_p=0.9 (1.0: no nucleus cut)"))
        if c.top_k < 0:
            out.append(Problem("generate.top_k", f"must be ≥ 0, got {c.top_k}", "generate.top_k=50 (0: no top-k cut)"))
        if c.do_sample and c.temperature <= 0:
            out.append(Problem("generate.temperature", "sampling needs temperature > 0",
                               "generate.temperature=0.7 or generate.do_sample=false"))
        out += P.file_problems("generate.prompt_file", c.prompt_file)
        if not c.prompt_file and c.prompts is not None and not [p for p in c.prompts if p.strip()]:
            out.append(Problem("generate.prompts", "the prompt list is empty",
                               "remove generate.prompts to use the built-in prompts"))
        out += self._engine_problems(root)
        if not out:
            out += self._context_problems(root)
        if root.model.task != "causal_lm":
            out.append(Problem("generate", f"model.task={root.model.task} cannot generate text",
                               "generate=encode for an encoder, or a causal LM model"))
        return out

    def _context_problems(self, root: Any) -> list[Problem]:
        """Prompt + new tokens must fit the model's context (its position table or rotary range):
        beyond it the output is garbage or an index error, after minutes of loading. Without
        ``prompt_tokens`` the prompts' length is unknown before tokenizing: the new tokens alone
        are checked."""
        from stages.load.sources import architecture, resolve_source

        if resolve_source(root.model) not in ("random", "local", "gguf", "embedded"):
            return []  # a hub model's config may need the network: its load reports a context error
        arch = architecture(root.model) or {}
        context = arch.get("max_position_embeddings") or arch.get("n_positions")
        c = self.cfg
        prompt = c.prompt_tokens or 0
        if not context or prompt + c.max_new_tokens <= context:
            return []
        if prompt >= context:
            return [Problem("generate.prompt_tokens", f"a {prompt}-token prompt fills the model's context of "
                            f"{context} tokens", f"generate.prompt_tokens={max(1, context // 2)} "
                            f"generate.max_new_tokens={min(c.max_new_tokens, context - context // 2)}")]
        what = f"prompt {prompt} + {c.max_new_tokens} new tokens" if prompt else f"{c.max_new_tokens} new tokens"
        return [Problem("generate.max_new_tokens", f"{what} exceed the model's context of {context} tokens",
                        f"generate.max_new_tokens={context - prompt}")]

    def _engine_problems(self, root: Any) -> list[Problem]:
        engine, problems = engines.build(self.cfg, list(root.pipeline.allow))
        return problems or engine.problems(root)

    def engine(self, allow: list[str]) -> Any:
        """The decode engine ``generate.engine`` names (built once; validation has vouched for it)."""
        if getattr(self, "_engine", None) is None:
            self._engine, problems = engines.build(self.cfg, allow)
            if problems:
                raise StageError(self.name, "; ".join(str(p) for p in problems))
        return self._engine

    def prompt_texts(self) -> list[str]:
        if self.cfg.prompt_file:
            return P.read_prompt_file(self.cfg.prompt_file)
        return [p for p in (self.cfg.prompts or P.DEFAULT_PROMPTS) if p.strip()]

    def generation_kwargs(self, tokenizer: Any, extra: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        kw: dict[str, Any] = dict(max_new_tokens=c.max_new_tokens, do_sample=c.do_sample,
                                  pad_token_id=tokenizer.pad_token_id)
        if c.do_sample:
            kw.update(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k)
        else:  # explicit, so a model's generation_config cannot turn sampling on behind our back
            kw.update(temperature=None, top_p=None, top_k=None)
        if c.benchmark:
            kw["min_new_tokens"] = c.max_new_tokens
        return {**kw, **extra}

    def apply(self, ctx: RunContext) -> StageResult:
        model, tok, c = ctx.model, ctx.tokenizer, self.cfg
        texts = P.replica_batch(self.prompt_texts(), c.batch_size, ctx.facts.replica)
        chat = P.use_chat_template(tok, c.chat_template) and not c.prompt_tokens
        if c.chat_template == "on" and not getattr(tok, "chat_template", None):
            raise StageError(self.name, "generate.chat_template=on but the tokenizer has no chat "
                             "template", "generate.chat_template=auto")
        inputs = {k: v.to(measure.input_device(model)) for k, v in P.encode(tok, texts, chat, c.prompt_tokens).items()}
        kwargs = self.generation_kwargs(tok, ctx.generate_kwargs)
        devices = measure.cuda_devices_in_use(model)
        engine = self.engine(list(ctx.cfg.pipeline.allow))
        summary, outputs, hook_tags, warmup_s = TimingSummary(), None, {}, 0.0
        with Progress(transient=True) as bar, workload_context(ctx.workload_hooks):
            task = bar.add_task(f"generate ×{c.batch_size}", total=c.warmup + c.repeats)
            for _ in range(c.warmup):  # compilation and allocator growth happen here, untimed
                timing, _ = self._one_run(model, inputs, kwargs, devices)
                warmup_s += timing.end - timing.start
                bar.advance(task)
            for hook in ctx.workload_hooks:
                hook_tags.update(hook.after_warmup(model))
            # beside other jobs of a sweep (launcher.split_devices): timed only while none loads or compiles
            with quiet_timing.quiet_host(ctx.dist.local_rank == 0) as quiet, gpu_clocks.ClockWatch(devices) as clocks:
                measure.reset_peaks(devices)
                graphs_before = compiled_graphs()
                for _ in range(c.repeats):
                    timing, outputs = self._one_run(model, inputs, kwargs, devices)
                    summary.runs.append(timing)
                    bar.advance(task)
            if quiet:
                hook_tags["generate.timed_beside_jobs"] = quiet_timing.describe(quiet)
            elif split_devices(ctx):
                hook_tags["generate.timed_beside_jobs"] = "neighbours may load or compile (launcher.quiet_timing=false)"
            profile = self._profile(ctx, model, inputs, kwargs, devices) if c.profile else {}
        hook_tags.update({"generate.engine": engine.name, **engine.tags(model)})
        metrics = summary.metrics()
        metrics["warmup_seconds"] = warmup_s  # includes compile time when convert compiles
        if devices:  # the cards' clocks while timed: a slowed card is not a slow engine
            metrics.update(clocks.metrics())
            hook_tags["generate.gpu_clocks"] = clocks.describe()
        metrics["recompiles_timed"] = float(compiled_graphs() - graphs_before)
        if metrics["recompiles_timed"]:
            hook_tags["generate.warning"] = (f"{metrics['recompiles_timed']:.0f} recompilation(s) "
                                             "during timed runs: raise generate.warmup")
        metrics.update({"prompt_tokens": float(inputs["input_ids"].shape[1]),
                        "batch_size": float(c.batch_size)})
        memory = {f"memory_{k}": v for k, v in measure.memory_peaks(devices).items()}
        if devices and "decode_tokens_per_s" in metrics:
            metrics.update(roofline_metrics(model, metrics, devices, ctx.facts.tensor_parallel))
        if "decode_tokens_per_s" not in metrics:
            hook_tags["generate.decode"] = "not applicable: every row stopped after its first token"
        noisy = noise(metrics, bool(devices))
        if noisy:  # the dashboard can filter on the tag; the console line says it at once
            hook_tags["generate.noisy"] = noisy
        samples = self._save_samples(ctx, tok, texts, inputs["input_ids"].shape[1], outputs)
        return StageResult(
            metrics={**metrics, **memory, **profile},
            across_ranks=ACROSS_RANKS_OF_GENERATE | across(WORST, memory),
            artifacts=[samples, *([self._profile_path(ctx)] if profile else [])],
            tags={"generate.chat_template": str(chat), **hook_tags,
                  "generate.mode": "sample" if c.do_sample else "greedy"},
            seconds=sum(r.end - r.start for r in summary.runs),
            summary=f"{decode_text(metrics)}, TTFT p50 {metrics['ttft_ms_p50']:.0f} ms, batch {c.batch_size}"
                    + (f" — NOISY: {noisy}" if noisy else ""))

    def _one_run(self, model, inputs, kwargs, devices) -> tuple[Timing, torch.Tensor]:
        torch.manual_seed(self.cfg.seed)  # every repeat samples the same way
        measure.synchronize(devices)  # nothing of the previous run may leak into this one
        clock = StepClock(measure.input_device(model))
        out = self._engine.generate(model, inputs, kwargs, eos_ids(model), clock)
        timing = clock.finish()
        timing.batch = inputs["input_ids"].shape[0]
        if not timing.steps:
            raise StageError(self.name, "generate produced no new token")
        return timing, out

    def _profile_path(self, ctx: RunContext):
        rank = f"_rank{ctx.dist.rank}" if ctx.dist.world_size > 1 else ""
        return ctx.output_dir / f"generate_profile_b{self.cfg.batch_size}{rank}.md"

    def _profile(self, ctx, model, inputs, kwargs, devices) -> dict[str, float]:
        """One more (untimed) run under the PyTorch profiler: where the decode time goes, per rank."""
        from pipeline.profile import profile_call, write_report

        runs: list[Timing] = []
        shares, top = profile_call(lambda: runs.append(self._one_run(model, inputs, kwargs, devices)[0]),
                                   cuda=bool(devices))
        steps = max(len(runs[0].steps), 1)  # prefill + decode steps of the profiled run
        shares["profile_device_ms_per_step"] = shares["profile_busy_ms"] / steps
        shares["profile_matmul_ms_per_step"] = shares["profile_busy_ms"] * shares.get("profile_matmul_share", 0) / steps
        rank = f", rank {ctx.dist.rank}" if ctx.dist.world_size > 1 else ""
        write_report(self._profile_path(ctx), f"generate, batch {self.cfg.batch_size}{rank}", shares, top)
        return shares

    def _save_samples(self, ctx, tok, texts, prompt_len, outputs):
        rank = f"_rank{ctx.dist.rank}" if ctx.dist.world_size > 1 else ""
        path = ctx.output_dir / f"generate_samples{rank}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for text, row in zip(texts, outputs):
                new = row[prompt_len:]
                f.write(json.dumps({"prompt": text, "output": tok.decode(new, skip_special_tokens=True),
                                    "new_tokens": int((new != tok.pad_token_id).sum()),
                                    "token_ids": new.tolist()}) + "\n")  # exact comparison across runs
        return path
