"""Where prompts come from and how they become one batch of token ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Our own short questions with well-known answers, so a reader can judge the outputs at a glance.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Name three primary colors.",
    "How many days are there in a week?",
    "What gas do plants take in from the air to make sugar?",
    "Write one sentence about the ocean.",
    "What is two plus two?",
    "Which planet is closest to the sun?",
    "Translate 'thank you' into Spanish.",
)


class PromptError(ValueError):
    pass


def read_prompt_file(path: str) -> list[str]:
    """A ``.txt`` file holds one prompt per line; a ``.jsonl`` file a ``prompt`` field per line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PromptError(f"prompt file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"prompt file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    lines = [line for line in text.splitlines() if line.strip()]
    if p.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise PromptError(f"{p}:{n}: expected a JSON object with a 'prompt' field ({e})") from e
        lines = prompts
    if not lines:
        raise PromptError(f"prompt file {str(p)!r} holds no prompts")
    return lines


def file_problems(key: str, path: str | None) -> list:
    """The validation view of ``read_prompt_file``: a Problem naming ``key`` instead of raising."""
    from pipeline.contract import Problem

    if not path:
        return []
    try:
        read_prompt_file(path)
    except PromptError as e:
        return [Problem(key, str(e), f"{key}=<a .txt file, one per line, or .jsonl with 'prompt'>")]
    return []


def batch_of(prompts: list[str], batch_size: int) -> list[str]:
    """The first ``batch_size`` prompts, cycling when there are fewer."""
    return [prompts[i % len(prompts)] for i in range(batch_size)]


def replica_batch(texts: list[str], batch_size: int, replica: tuple[int, int] = (0, 1),
                  batch_index: int = 0) -> list[str]:
    """Batch ``batch_index`` of data-parallel replica ``replica = (index, count)``, cycling through
    ``texts``: replicas take interleaved slices, so none repeats another's texts while there are enough."""
    index, count = replica
    start = (batch_index * count + index) * batch_size
    return [texts[(start + i) % len(texts)] for i in range(batch_size)]


def use_chat_template(tokenizer: Any, mode: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    return has if mode == "auto" else (mode == "on")


def encode(tokenizer: Any, texts: list[str], chat: bool, exact_tokens: int | None) -> dict[str, torch.Tensor]:
    """Token ids for one batch. ``exact_tokens`` repeats/trims each prompt to exactly N tokens."""
    if exact_tokens:
        rows = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
            rows.append((ids * (exact_tokens // len(ids) + 1))[:exact_tokens])
        ids = torch.tensor(rows)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
        return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    return dict(tokenizer(texts, return_tensors="pt", padding=True))
