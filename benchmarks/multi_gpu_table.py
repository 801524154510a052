"""Table of the multi-GPU runs (benchmarks/multi_gpu.sh) against one GPU of the same machine
(the `optipipe bench` JSON of the same session).

    python benchmarks/multi_gpu_table.py STORE_DIR/multi.db BENCH_DIR/bench.json
"""

from __future__ import annotations

import json
import sys


def main(db: str, bench_json: str) -> None:
    from mlflow.tracking import MlflowClient

    one = {(r["config"], r["batch"]): r for r in json.loads(open(bench_json).read())["rows"]}
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("multi-gpu")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    print("| run | GPUs | batch | status | decode tok/s | × 1 GPU fast | × 1 GPU plain | peak GiB/GPU | MBU/GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        m, tags = run.data.metrics, run.data.tags
        batch = int(float(run.data.params.get("generate.batch_size", "0")))
        tps = m.get("generate/decode_tokens_per_s", float("nan"))
        fast = one.get(("generate=fast", batch), {}).get("decode_tokens_per_s", float("nan"))
        plain = one.get(("plain", batch), {}).get("decode_tokens_per_s", float("nan"))
        gpus = tags.get("world_size", "1") if tags.get("choice.shard") != "pipeline" else "2"
        print(f"| {run.info.run_name} | {gpus} | {batch} | {run.info.status} | {tps:.1f} | {tps / fast:.2f} | "
              f"{tps / plain:.2f} | {m.get('generate/memory_peak_allocated_gib', float('nan')):.1f} | "
              f"{m.get('generate/mbu', float('nan')):.2f} |")
        if run.info.status != "FINISHED":
            print(f"|  ↳ {tags.get('optipipe.error', '')[:300]} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
