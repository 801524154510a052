"""The evaluate stage: perplexity, agreement with the unoptimized model, and a quality gate.

Order matters for memory: the optimized model is measured first; then the reference comes from
the cache or is loaded — after the optimized model is released if both would not fit.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import psutil
import torch

from pipeline.measure import input_device
from pipeline.contract import BaseStage, Problem, RunContext, StageError, StageResult
from stages.evaluate import compare, corpus
from stages.evaluate.perplexity import WINDOWINGS, perplexity
from stages.generate import prompts as P
from stages.generate.encode import default_texts, pool
from stages.load import sources
from stages.settings import EvaluateConfig

CACHE_VERSION = 1  # bump when what is cached changes meaning


def prefix_token(tok: Any) -> int | None:
    """What lm-eval's rolling windows start with: BOS, else EOS (None: neither; strided only)."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


class Evaluate(BaseStage):
    name: ClassVar[str] = "evaluate"
    Config: ClassVar[type] = EvaluateConfig

    def problems(self, root: Any) -> list[Problem]:
        c, out = self.cfg, []
        if c.max_length < 2:
            out.append(Problem("evaluate.max_length", "must be ≥ 2", "evaluate.max_length=256"))
        if not 0 < c.stride <= c.max_length:
            out.append(Problem("evaluate.stride", f"must be in 1..max_length ({c.max_length}), got "
                               f"{c.stride}", f"evaluate.stride={max(1, c.max_length // 2)}"))
        if c.windowing not in WINDOWINGS:
            out.append(Problem("evaluate.windowing", f"unknown windowing {c.windowing!r}",
                               f"evaluate.windowing=<one of {', '.join(WINDOWINGS)}>"))
        if c.reference_dtype not in (None, "bfloat16", "float16", "float32"):
            out.append(Problem("evaluate.reference_dtype", f"unknown dtype {c.reference_dtype!r}",
                               "evaluate.reference_dtype=float32"))
        if c.corpus.max_chars < 1:
            out.append(Problem("evaluate.corpus.max_chars", f"must be ≥ 1, got {c.corpus.max_chars}",
                               "evaluate.corpus.max_chars=8000"))
        if c.corpus.file and c.corpus.dataset:
            out.append(Problem("evaluate.corpus", "both a file and a dataset are set",
                               "keep one: evaluate.corpus.dataset=null"))
        if c.corpus.file:
            try:
                corpus.from_file(c.corpus.file, c.corpus.field, c.corpus.max_chars)
            except corpus.CorpusError as e:
                out.append(Problem("evaluate.corpus.file", str(e), "evaluate.corpus.file=<a non-empty text file>"))
        return out

    # ------------------------------------------------------------------ measurements

    def measure(self, model: Any, tok: Any, task: str, ids: torch.Tensor | None, keep_full: bool) -> dict:
        """Everything compared between models, for one model."""
        if task == "encoder":
            texts = default_texts()[:32]
            enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt").to(input_device(model))
            with torch.inference_mode():
                emb = pool(model(**enc).last_hidden_state, enc["attention_mask"], "mean")
            return {"embeddings": emb.float().cpu()}
        c = self.cfg
        ppl = perplexity(model, ids, c.max_length, c.stride, c.batch_size, keep_positions=c.compare_tokens,
                         windowing=c.windowing, prefix_token=prefix_token(tok))
        logprobs = torch.cat(ppl.logprobs)
        out = {"nll_sum": ppl.nll_sum, "scored_tokens": ppl.scored_tokens, "windows": ppl.windows,
               "argmax": logprobs.argmax(-1)}
        if c.reference:  # the greedy continuation only serves the comparison with the reference
            out["greedy"] = self.greedy(model, tok)
        if keep_full:
            out["logprobs"] = logprobs
        out["topk_values"], out["topk_indices"] = compare.top_k(logprobs)
        return out

    def greedy(self, model: Any, tok: Any) -> list[list[int]]:
        texts = list(P.DEFAULT_PROMPTS)
        chat = P.use_chat_template(tok, "auto")
        inputs = {k: v.to(input_device(model)) for k, v in P.encode(tok, texts, chat, None).items()}
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=self.cfg.new_tokens, min_new_tokens=self.cfg.new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id, disable_compile=True)
        return out[:, inputs["input_ids"].shape[1]:].tolist()

    # ------------------------------------------------------------------ the reference

    def cache_path(self, ctx: RunContext, corpus_sha: str, dtype: str) -> Path:
        spec = ctx.facts.model_spec
        key = {"v": CACHE_VERSION, "model": asdict(spec), "dtype": dtype, "corpus": corpus_sha,
               "max_length": self.cfg.max_length, "stride": self.cfg.stride, "windowing": self.cfg.windowing,
               "compare_tokens": self.cfg.compare_tokens, "new_tokens": self.cfg.new_tokens,
               "top_k": compare.TOP_K}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return sources.cache_root(ctx.facts.cache_dir) / "reference" / f"{digest}.pt"

    def reference_results(self, ctx: RunContext, ids, dtype: str) -> tuple[dict, bool]:
        path = self.cache_path(ctx, ctx.facts.corpus_sha, dtype)
        if self.cfg.cache and path.is_file():
            return torch.load(path, weights_only=True), True
        self._make_room(ctx, dtype)
        model, tok = ctx.reference(dtype)
        results = self.measure(model, tok, ctx.facts.model_spec.task, ids, keep_full=False)
        del model
        gc.collect()
        if self.cfg.cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(results, tmp)
            tmp.replace(path)  # parallel jobs never read half a file
        return results, False

    def _make_room(self, ctx: RunContext, dtype: str) -> None:
        """Free the optimized model when the reference would not fit beside it; refuse if never."""
        need = ctx.facts.parameters * {"float32": 4}.get(dtype, 2) * 1.2
        on_cuda = ctx.model is not None and ctx.model.device.type == "cuda"

        def free() -> float:
            return torch.cuda.mem_get_info(ctx.model.device)[0] if on_cuda else psutil.virtual_memory().available

        device = ctx.model.device if ctx.model is not None else None
        if free() >= need:
            return
        ctx.model = None  # the optimized model's results are already taken
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        room = torch.cuda.mem_get_info(device)[0] if on_cuda else psutil.virtual_memory().available
        if room < need:
            raise StageError(self.name, f"the reference model needs ~{need / 2**30:.1f} GiB and only "
                             f"{room / 2**30:.1f} GiB is free", "evaluate.reference_dtype=bfloat16, or "
                             "evaluate.reference=false (perplexity only)")

    # ------------------------------------------------------------------ the stage

    def apply(self, ctx: RunContext) -> StageResult:
        task = ctx.facts.model_spec.task
        ids, metrics, tags = None, {}, {}
        if task != "encoder":
            text = self._corpus(ctx)
            ids = torch.tensor(ctx.tokenizer(text.text, add_special_tokens=False)["input_ids"])
            if self.cfg.windowing == "rolling" and prefix_token(ctx.tokenizer) is None:
                raise StageError(self.name, "rolling windows start with the tokenizer's BOS or EOS token, "
                                 "and this tokenizer has neither", "evaluate.windowing=strided")
            if ids.numel() < 2:
                raise StageError(self.name, f"the corpus {text.name!r} has {ids.numel()} token(s): nothing "
                                 "to predict", "a longer evaluate.corpus.file (or evaluate.corpus.max_chars)")
            tags.update({"evaluate.corpus": text.name, "evaluate.corpus_sha256": text.sha256,
                         "evaluate.windowing": self.cfg.windowing})
            if ids.numel() <= self.cfg.max_length:  # not an error: the whole corpus is one window
                tags["evaluate.windows_note"] = (f"the corpus ({ids.numel()} tokens) fits one window of "
                                                 f"evaluate.max_length={self.cfg.max_length}")
            ctx.facts.corpus_sha = text.sha256
        ours = self.measure(ctx.model, ctx.tokenizer, task, ids, keep_full=True)
        if task != "encoder":
            metrics.update(perplexity=float(torch.exp(torch.tensor(ours["nll_sum"] / ours["scored_tokens"]))),
                           scored_tokens=float(ours["scored_tokens"]), windows=float(ours["windows"]))
        if self.cfg.reference:
            dtype = self.cfg.reference_dtype or ctx.facts.load_dtype
            ref, hit = self.reference_results(ctx, ids, dtype)
            tags.update({"evaluate.reference": f"{dtype}, eager, no quantization",
                         "evaluate.reference_cache": "hit" if hit else "miss"})
            metrics.update(self.comparison(task, ours, ref))
        gate, why = self.gate(metrics)
        tags["evaluate.gate"] = gate
        if why:
            tags["evaluate.gate_failures"] = "; ".join(why)
        result = StageResult(metrics=metrics, tags=tags, summary=self.summary(metrics, gate))
        if gate == "fail" and self.cfg.gate.enforce:
            ctx.facts.partial_result = result  # the runner logs it before marking the run FAILED
            raise StageError(self.name, "quality gate failed: " + "; ".join(why),
                             "relax evaluate.gate.*, or pick a milder optimization")
        return result

    def _corpus(self, ctx: RunContext) -> corpus.Corpus:
        try:
            return corpus.load(self.cfg.corpus)
        except corpus.CorpusError as e:
            raise StageError(self.name, str(e), "evaluate.corpus.file=<a text file>") from e

    @staticmethod
    def comparison(task: str, ours: dict, ref: dict) -> dict[str, float]:
        if task == "encoder":
            cos = compare.cosine(ours["embeddings"], ref["embeddings"])
            return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
        ref_ppl = float(torch.exp(torch.tensor(ref["nll_sum"] / ref["scored_tokens"])))
        ours_ppl = float(torch.exp(torch.tensor(ours["nll_sum"] / ours["scored_tokens"])))
        kl = compare.coarse_kl(ref["topk_values"], ref["topk_indices"], ours["logprobs"])
        return {"reference_perplexity": ref_ppl,
                "perplexity_increase_pct": 100 * (ours_ppl / ref_ppl - 1),
                "top1_agreement": float((ours["argmax"] == ref["argmax"]).float().mean()),
                "kl_mean": float(kl.mean()), "kl_p90": float(kl.quantile(0.9)),
                "token_agreement": compare.prefix_agreement(ref["greedy"], ours["greedy"])}

    def gate(self, m: dict[str, float]) -> tuple[str, list[str]]:
        """pass / fail / not set, and each broken threshold named by its config key."""
        g, why = self.cfg.gate, []
        checks = [("perplexity_increase_pct", "max_perplexity_increase_pct", g.max_perplexity_increase_pct, ">"),
                  ("token_agreement", "min_token_agreement", g.min_token_agreement, "<"),
                  ("top1_agreement", "min_top1_agreement", g.min_top1_agreement, "<"),
                  ("kl_mean", "max_kl", g.max_kl, ">"), ("cosine_min", "min_cosine", g.min_cosine, "<")]
        active = [c for c in checks if c[2] is not None]
        for metric, key, threshold, broken in active:
            if metric not in m:
                why.append(f"{metric} was not measured for evaluate.gate.{key} (needs evaluate.reference=true)")
            elif (m[metric] > threshold) if broken == ">" else (m[metric] < threshold):
                why.append(f"{metric} = {m[metric]:.4g} {broken} evaluate.gate.{key}={threshold}")
        if not active:
            return "not set", []
        return ("fail" if why else "pass"), why

    @staticmethod
    def summary(m: dict[str, float], gate: str) -> str:
        parts = []
        if "perplexity" in m:
            parts.append(f"ppl {m['perplexity']:.3f}")
        if "perplexity_increase_pct" in m:
            parts.append(f"{m['perplexity_increase_pct']:+.2f}% vs ref, top-1 {m['top1_agreement']:.3f}, "
                         f"greedy {m['token_agreement']:.2f}, KL {m['kl_mean']:.4f}")
        if "cosine_mean" in m:
            parts.append(f"cosine vs ref {m['cosine_mean']:.5f} (min {m['cosine_min']:.5f})")
        return ", ".join(parts) + f"; gate {gate}"
