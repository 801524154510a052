#!/usr/bin/env bash
# The short 4-GPU call of 2026-11-26: one-GPU reference rows on GPU 0 first (same machine), then
# 4-GPU jobs (its time allowed the first, tp4_fast_b1).
set -u
export OPTIPIPE="python3 -m pipeline" OPTIPIPE_CACHE=$PWD/.bench-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpus.txt
ls .bench-cache/random/llama3-8b-*/config.json >/dev/null 2>&1 || timeout 100 $OPTIPIPE model=llama3_8b_random \
    load.dtype=bfloat16 generate.max_new_tokens=2 generate.warmup=0 generate.repeats=1 tracker=none | tail -2
CUDA_VISIBLE_DEVICES=0 timeout 150 $OPTIPIPE bench --model llama3_8b_random --batches 32 --repeats 2 --warmup 1 \
    --baselines plain --configs generate=fast --out $OUT/bench --tracker-uri sqlite:///$OUT/bench.db > $OUT/bench.log 2>&1 &
CUDA_VISIBLE_DEVICES=1,2 timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/pipeline/test_distributed.py > $OUT/gpu_tests.log 2>&1 &
wait
timeout 240 bash benchmarks/multi_gpu.sh $OUT 4gpu > $OUT/multi4.log 2>&1
tail -3 $OUT/gpu_tests.log; tail -6 $OUT/bench/bench.md; grep -v "^$" $OUT/multi4.log | tail -30
