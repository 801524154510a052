"""Encoders run through the same pipeline: load as encoder, sdpa|eager, the encode workload."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import mlflow_runs, run_cli


def test_tiny_bert_encode_end_to_end(tmp_path):
    proc = run_cli("model=tiny_bert_random", "generate=encode", "generate.batch_size=8", "generate.repeats=2",
                   cwd=tmp_path, check=0)
    assert "seq/s" in proc.stdout
    _, runs = mlflow_runs(tmp_path / "outputs" / "mlflow.db")
    m = runs[0].data.metrics
    assert m["generate/sequences_per_s"] > 0 and 0 < m["generate/padding_fraction"] < 1
    assert m["generate/batch_latency_ms_p90"] >= m["generate/batch_latency_ms_p50"]


def test_generate_on_an_encoder_is_refused(tmp_path):
    proc = run_cli("model=tiny_bert_random", cwd=tmp_path, check=2)
    assert "generate=encode" in proc.stderr


@pytest.mark.slow
def test_real_minilm_sdpa_matches_eager_embeddings(tmp_path):
    heads = {}
    for impl in ("sdpa", "eager"):
        run_cli("experiment=encoder", f"convert={impl}", "generate.repeats=1", "tracker=none",
                f"hydra.run.dir={tmp_path}/{impl}", cwd=tmp_path, check=0)
        rows = [json.loads(x) for x in (tmp_path / impl / "encode_samples.jsonl").read_text().splitlines()]
        heads[impl] = np.array([r["embedding_head"] for r in rows])
    a, b = heads["sdpa"], heads["eager"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999


def test_data_parallel_replicas_encode_different_texts():
    from stages.generate.prompts import replica_batch

    def chunk_of(texts, batch_size, b, replica):
        return replica_batch(texts, batch_size, replica, batch_index=b)

    texts = [f"t{i}" for i in range(10)]
    assert chunk_of(texts, 2, 0, (0, 1)) == ["t0", "t1"] and chunk_of(texts, 2, 1, (0, 1)) == ["t2", "t3"]
    first, second = ([x for b in range(2) for x in chunk_of(texts, 2, b, (r, 2))] for r in (0, 1))
    assert first == ["t0", "t1", "t4", "t5"] and second == ["t2", "t3", "t6", "t7"]
