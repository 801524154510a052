"""MBU arithmetic against a hand-computed case."""

from types import SimpleNamespace

import pytest

from pipeline import roofline

# Llama-3-8B: 32 layers, 8 KV heads of 128 dims
LLAMA3_8B = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                            hidden_size=4096, head_dim=128)


def test_kv_cache_bytes_by_hand():
    # 2 (k,v) × 32 layers × 1 seq × 1000 tokens × 8 heads × 128 dims × 2 bytes = 131,072,000
    assert roofline.kv_cache_bytes(LLAMA3_8B, 1, 1000, 2) == 131_072_000


def test_mbu_by_hand():
    # 16.06e9 weight bytes + KV at mean context 128 + 256/2 = 256 tokens (256 × 131,072 bytes)
    step = roofline.decode_step_bytes(16.06e9, LLAMA3_8B, 1, 128, 256, 2)
    assert step == pytest.approx(16.06e9 + 256 * 131_072)
    # 116 tok/s at batch 1 on 3.0 TB/s: 16.0936e9 × 116 / 3e12 = 0.6223
    assert roofline.mbu(step, 1 / 116, 3.0e12) == pytest.approx(0.6223, abs=1e-3)
