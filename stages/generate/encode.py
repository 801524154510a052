"""The encode workload (``generate=encode``): batches of texts through an encoder, timed.

Texts vary in length and each batch is padded to its longest text, as a real embedding service
sees them, so the padding share (and what SDPA's fast paths do with it) is part of the measurement.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import torch
from rich.progress import Progress

from pipeline import measure
from pipeline.contract import REPLICA_SUM, WORST, BaseStage, Problem, RunContext, StageResult, across, workload_context
from stages.generate import prompts as P
from stages.settings import EncodeConfig


def default_texts() -> list[str]:
    """Deterministic texts of varied length built from our own prompt sentences."""
    base = list(P.DEFAULT_PROMPTS)
    return [" ".join(base[(i + j) % len(base)] for j in range(1 + i % 8)) for i in range(64)]


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


class Encode(BaseStage):
    name: ClassVar[str] = "generate"
    Config: ClassVar[type] = EncodeConfig

    def problems(self, root: Any) -> list[Problem]:
        c, out = self.cfg, []
        for key in ("batch_size", "max_length", "batches", "repeats"):
            if getattr(c, key) < 1:
                out.append(Problem(f"generate.{key}", f"must be ≥ 1, got {getattr(c, key)}",
                                   f"generate.{key}=1"))
        if c.pooling not in ("mean", "cls"):
            out.append(Problem("generate.pooling", f"unknown pooling {c.pooling!r}", "generate.pooling=mean|cls"))
        if root.model.task != "encoder":
            out.append(Problem("generate", "generate=encode needs an encoder model",
                               "model=minilm_l6 (or model.task=encoder), or generate=default"))
        return out + P.file_problems("generate.text_file", c.text_file)

    def texts(self) -> list[str]:
        if self.cfg.text_file:
            return P.read_prompt_file(self.cfg.text_file)
        return list(self.cfg.texts) if self.cfg.texts else default_texts()

    def batches(self, tokenizer: Any, device: torch.device,
                replica: tuple[int, int] = (0, 1)) -> list[dict[str, torch.Tensor]]:
        c, texts = self.cfg, self.texts()
        out = []
        for b in range(c.batches):
            chunk = P.replica_batch(texts, c.batch_size, replica, batch_index=b)
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=c.max_length, return_tensors="pt")
            out.append({k: v.to(device) for k, v in enc.items()})
        return out

    def apply(self, ctx: RunContext) -> StageResult:
        c, model = self.cfg, ctx.model
        batches = self.batches(ctx.tokenizer, measure.input_device(model), ctx.facts.replica)
        devices = measure.cuda_devices_in_use(model)
        latencies, run_seconds, embeddings = [], [], None
        with Progress(transient=True) as bar, workload_context(ctx.workload_hooks), torch.inference_mode():
            task = bar.add_task("encode", total=c.warmup + c.repeats)
            for i in range(c.warmup + c.repeats):
                if i == c.warmup:
                    measure.reset_peaks(devices)
                start = measure.now(devices)
                for batch in batches:
                    t0 = measure.now(devices)
                    hidden = model(**batch).last_hidden_state
                    embeddings = pool(hidden, batch["attention_mask"], c.pooling)
                    if i >= c.warmup:
                        latencies.append(measure.now(devices) - t0)
                if i >= c.warmup:
                    run_seconds.append(measure.now(devices) - start)
                bar.advance(task)
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["attention_mask"].numel() for b in batches)
        per_run = float(np.median(run_seconds))
        lat = np.array(latencies) * 1e3
        metrics = {"sequences_per_s": c.batch_size * c.batches / per_run, "tokens_per_s": real / per_run,
                   "batch_latency_ms_p50": float(np.percentile(lat, 50)),
                   "batch_latency_ms_p90": float(np.percentile(lat, 90)),
                   "padding_fraction": 1 - real / padded, "batch_size": float(c.batch_size)}
        memory = {f"memory_{k}": v for k, v in measure.memory_peaks(devices).items()}
        metrics.update(memory)
        path = ctx.output_dir / "encode_samples.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for text, emb in zip(self.texts(), embeddings.float().cpu()):
                f.write(json.dumps({"text": text, "embedding_norm": float(emb.norm()),
                                    "embedding_head": [round(x, 5) for x in emb[:8].tolist()]}) + "\n")
        return StageResult(metrics=metrics, artifacts=[path], seconds=sum(run_seconds),
                           across_ranks={**across(REPLICA_SUM, ["sequences_per_s", "tokens_per_s"]),
                                         **across(WORST, ["batch_latency_ms_p50", "batch_latency_ms_p90", *memory])},
                           summary=f"{metrics['sequences_per_s']:.0f} seq/s, {metrics['tokens_per_s']:.0f} "
                                   f"tok/s, batch p50 {metrics['batch_latency_ms_p50']:.1f} ms, "
                                   f"{metrics['padding_fraction']:.0%} padding")
