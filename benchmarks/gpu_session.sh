#!/usr/bin/env bash
# What one lent GPU machine ran for BENCHMARKS.md (4 GPUs):
#   phase 1: `optipipe bench` on GPU 0 (one card, side by side) while 2-GPU jobs use GPUs 2,3
#   phase 2: 4-GPU jobs and the GPU-marked tests
# Writes everything under $OUT (MLflow stores, bench.json/md, logs).
set -u
export OPTIPIPE="python3 -m pipeline" OPTIPIPE_CACHE=$PWD/.bench-cache PYTHONUNBUFFERED=1
phase=${1:?phase 1|2}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpus.txt
if [ "$phase" = 1 ]; then
  # random Llama-3-8B-shaped weights, created once into the cache (also a smoke test of the default path)
  timeout 200 $OPTIPIPE model=llama3_8b_random load.dtype=bfloat16 generate.max_new_tokens=4 generate.warmup=0 \
      generate.repeats=1 tracker=none 2>&1 | tail -12
  CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/stages/test_engine.py \
      > $OUT/gpu_tests.log 2>&1 &
  CUDA_VISIBLE_DEVICES=0 timeout 500 $OPTIPIPE bench --model llama3_8b_random --batches 1,32 --repeats 2 \
      --warmup 1 --configs generate=fast "quantize=int4_torchao generate=fast" \
      --out $OUT/bench --tracker-uri sqlite:///$OUT/bench.db > $OUT/bench.log 2>&1 &
  timeout 500 bash benchmarks/multi_gpu.sh $OUT 2gpu > $OUT/multi2.log 2>&1
  wait
  tail -3 $OUT/gpu_tests.log; tail -16 $OUT/bench.log; cat $OUT/multi2.log | grep -v "^$" | tail -60
else
  ls .bench-cache/random/llama3-8b-*/config.json >/dev/null 2>&1 || timeout 200 $OPTIPIPE model=llama3_8b_random \
      load.dtype=bfloat16 generate.max_new_tokens=4 generate.warmup=0 generate.repeats=1 tracker=none | tail -3
  timeout 330 bash benchmarks/multi_gpu.sh $OUT 4gpu > $OUT/multi4.log 2>&1
  cat $OUT/multi4.log | grep -v "^$" | tail -40
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/pipeline/test_distributed.py 2>&1 | tail -3
fi
