"""One home for keeping secrets out of everything a run writes: the store, artifacts, run names, the
console and the sweep's files.

A value is masked as ``***`` when its key looks secret (``hf_token``, ``db_password``, ``api_key``),
when it looks like a credential whatever its key (``hf_…``, ``sk-…``, GitHub and AWS access keys, the
password of a ``scheme://user:password@host`` URI), or when it holds the value of a secret-looking
environment variable (a config that interpolates ``${oc.env:HF_TOKEN}`` resolves to the token itself).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

MASK = "***"
# A leaf key is secret when it *ends* in one of these words (hf_token, db_password, api_key),
# not when it merely contains one (max_new_tokens, prompt_tokens are not secrets).
SECRET_LEAF = re.compile(r"(^|_)(token|password|passwd|secret|secret_key|access_key|private_key|"
                         r"api_key|apikey|credentials?|authorization)$")
TOKENIZER_WORDS = {"pad_token", "bos_token", "eos_token", "unk_token", "sep_token", "cls_token",
                   "mask_token"}
# Credentials recognisable by their shape alone (Hugging Face, OpenAI-style, GitHub, AWS, Slack).
TOKEN_SHAPES = re.compile(r"\bhf_[A-Za-z0-9]{16,}|\bsk-[A-Za-z0-9_-]{16,}|\bgh[pousr]_[A-Za-z0-9]{30,}"
                          r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bxox[abprs]-[A-Za-z0-9-]{10,}")
# key=value as typed on a command line (Hydra echoes overrides in its logs and errors)
ASSIGNMENT = re.compile(r"(?P<key>[\w.]+)=(?P<value>[^\s,\]\[\'\"]+)")
URI_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+):[^/\s@]+@")
MIN_ENV_SECRET = 6  # shorter environment values ("1", "true") would mask ordinary text


def is_secret_key(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1].lower()
    return bool(SECRET_LEAF.search(leaf)) and leaf not in TOKENIZER_WORDS


@functools.lru_cache(maxsize=1)
def _env_secrets() -> tuple[str, ...]:
    """Values of secret-looking environment variables, longest first (a value inside another is
    masked by the longer one first); read once per process."""
    found = {v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= MIN_ENV_SECRET}
    return tuple(sorted(found, key=len, reverse=True))


def redact_text(text: str) -> str:
    """``text`` with every credential in it masked."""
    for value in _env_secrets():
        text = text.replace(value, MASK)
    text = URI_PASSWORD.sub(rf"\1:{MASK}@", text)
    text = ASSIGNMENT.sub(lambda m: f"{m['key']}={MASK}" if is_secret_key(m["key"]) else m[0], text)
    return TOKEN_SHAPES.sub(MASK, text)


def redact(node: Any, key: str = "") -> Any:
    """A copy of a plain config tree (dicts, lists, scalars) with secret keys and values masked."""
    if key and is_secret_key(key):
        return MASK
    if isinstance(node, dict):
        return {k: redact(v, str(k)) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [redact(v) for v in node]
    return redact_text(node) if isinstance(node, str) else node


def redact_overrides(overrides: list[str]) -> list[str]:
    """Overrides as typed, with secret values masked (``hf_token=…`` must not reach a store)."""
    out = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        out.append(f"{o.split('=', 1)[0]}={MASK}" if "=" in o and is_secret_key(key) else redact_text(o))
    return out


class RedactingStream:
    """A text stream that masks credentials in what is written to it: wraps the process's stdout
    and stderr, so messages we do not format ourselves (Hydra's own errors echo the override as
    typed) are masked too."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def redact_console() -> None:
    """Route this process's stdout and stderr through ``RedactingStream`` (once)."""
    import sys

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))

