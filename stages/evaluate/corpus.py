"""Text to score: a file, a JSONL field, a Hugging Face dataset, or the offline default.

The offline default is assembled at run time from the docstrings of a fixed list of Python
standard-library modules: every Python installation carries them, nothing is downloaded, and no
text written by others is committed here. It is deterministic for a given Python version; its
SHA-256 is logged so numbers are only compared on the same text.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

STDLIB_MODULES = ("argparse", "collections", "contextlib", "csv", "dataclasses", "functools",
                  "heapq", "itertools", "json", "logging", "pathlib", "shutil", "string",
                  "subprocess", "tempfile", "textwrap", "threading", "unittest", "urllib.parse", "zipfile")


class CorpusError(ValueError):
    pass


@dataclass
class Corpus:
    text: str
    name: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def stdlib_docs(max_chars: int) -> Corpus:
    """Module and public-member docstrings of ``STDLIB_MODULES``, in a fixed order."""
    parts: list[str] = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:  # one-liners are mostly signatures, not prose
                parts.append(doc)
    text = "\n\n".join(p for p in parts if p)[:max_chars]
    return Corpus(text, f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib-docs")


def from_file(path: str, field: str | None, max_chars: int) -> Corpus:
    p = Path(path).expanduser()
    if not p.is_file():
        raise CorpusError(f"corpus file {str(p)!r} does not exist")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if p.suffix == ".jsonl":
        key = field or "text"
        try:
            raw = "\n\n".join(str(json.loads(line)[key]) for line in raw.splitlines() if line.strip())
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorpusError(f"{p}: every line must be a JSON object with a {key!r} field ({e})") from e
    if not raw.strip():
        raise CorpusError(f"corpus file {str(p)!r} is empty")
    return Corpus(raw[:max_chars], p.name)


def from_dataset(name: str, config: str | None, split: str, field: str | None, max_chars: int) -> Corpus:
    try:
        import datasets
    except ImportError as e:
        raise CorpusError("evaluate.corpus.dataset needs the datasets package: pip install datasets") from e
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, gated: all are the user's to fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CorpusError(f"dataset {name!r} cannot be loaded ({first}); offline machines need "
                          "evaluate.corpus.file=<a text file> or the default corpus") from e
    key = field or "text"
    text, total = [], 0
    for row in data:
        text.append(str(row[key]))
        total += len(text[-1])
        if total >= max_chars:
            break
    return Corpus("\n\n".join(text)[:max_chars], f"{name}/{config or ''}/{split}")


def load(settings) -> Corpus:
    if settings.file:
        return from_file(settings.file, settings.field, settings.max_chars)
    if settings.dataset:
        return from_dataset(settings.dataset, settings.dataset_config, settings.split, settings.field,
                            settings.max_chars)
    return stdlib_docs(settings.max_chars)
