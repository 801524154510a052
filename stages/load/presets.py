"""Architecture shapes for random-weight models: real shapes, no weight download.

Speed depends on shapes, not on weight values, so benchmarks build these at their real size.
Shapes are taken from the published config.json of each model (source named per preset).
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                      eos_token_id=128001),
    # meta-llama/Llama-3.2-1B config.json (rope scaling left out: it does not change speed)
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000,
                        eos_token_id=128001),
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # a few-MB Llama for tests: every code path of the real thing, in milliseconds
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2),
    # google-bert/bert-base-uncased config.json
    "bert-base": dict(model_type="bert", hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=12, num_attention_heads=12, vocab_size=30522,
                      max_position_embeddings=512),
    # sentence-transformers/all-MiniLM-L6-v2 config.json
    "minilm-l6": dict(model_type="bert", hidden_size=384, intermediate_size=1536,
                      num_hidden_layers=6, num_attention_heads=12, vocab_size=30522,
                      max_position_embeddings=512),
    "tiny-bert": dict(model_type="bert", hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                      max_position_embeddings=128),
}


def preset_config(name: str, overrides: dict[str, Any] | None = None):
    """A transformers config for preset ``name`` with ``overrides`` applied (no download)."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise KeyError(name)
    values = {**PRESETS[name], **(overrides or {})}
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)
