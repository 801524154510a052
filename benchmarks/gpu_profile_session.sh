#!/usr/bin/env bash
# The 4-GPU calls of 2026-11-26's third session (issues 5 and 6: profiles and the rows still missing).
#   call 1: GPU 0/1 one-card benches, GPUs 2,3 multi_gpu.sh rest2
#   call 2: GPU 0 `optipipe bench --profile` at batch 1 and 32; GPU 1 batch-1 variants (compile mode,
#           4-bit) with profiles; GPUs 2,3 multi_gpu.sh rest2b; then multi_gpu.sh rest4a on all four
#   call 3: the GQA decode attention against the old one (GPU 0, profiled), 4-bit rows (GPU 1), GPU
#           tests (GPUs 2,3), then multi_gpu.sh rest4b (data parallel × tensor parallel: failed, see BENCHMARKS.md)
#   call 4: multi_gpu.sh rest4b again, after replicas × TP moved to stages/shard/replica_tp.py
set -u
export OPTIPIPE="python3 -m pipeline" OPTIPIPE_CACHE=$PWD/.bench-cache PYTHONUNBUFFERED=1
call=${1:?call 1|2}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpus.txt
ls .bench-cache/random/llama3-8b-*/config.json >/dev/null 2>&1 || timeout 100 $OPTIPIPE model=llama3_8b_random \
    load.dtype=bfloat16 generate.max_new_tokens=2 generate.warmup=0 generate.repeats=1 tracker=none 2>&1 | tail -2
if [ "$call" = 1 ]; then  # run first; both benches were cut at 400 s (the profiler traced host ops then)
  CUDA_VISIBLE_DEVICES=0 timeout 400 $OPTIPIPE bench --model llama3_8b_random --batches 1,32 --repeats 2 --warmup 1 \
      --profile --configs generate=fast "quantize=int4_torchao generate=fast" \
      --out $OUT/bench --tracker-uri sqlite:///$OUT/bench.db > $OUT/bench.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 400 $OPTIPIPE bench --model llama3_8b_random --batches 1,32 --repeats 2 --warmup 1 \
      --baselines plain --configs generate=fast "generate=fast generate.fast_compile_mode=max-autotune" \
      "quantize=int4_torchao quantize.include_embeddings=true generate=fast" \
      --out $OUT/modes --no-track > $OUT/modes.log 2>&1 &
  timeout 400 bash benchmarks/multi_gpu.sh $OUT rest2 > $OUT/multi2.log 2>&1
  wait
elif [ "$call" = 2 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 280 $OPTIPIPE bench --model llama3_8b_random --batches 1,32 --repeats 2 --warmup 1 \
      --profile --baselines plain --configs generate=fast \
      --out $OUT/bench --tracker-uri sqlite:///$OUT/bench.db > $OUT/bench.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 280 $OPTIPIPE bench --model llama3_8b_random --batches 1 --repeats 2 --warmup 1 \
      --profile --baselines plain --configs generate=fast "generate=fast generate.fast_compile_mode=max-autotune" \
      "quantize=int4_torchao generate=fast" "quantize=int4_torchao quantize.include_embeddings=true generate=fast" \
      --out $OUT/b1 --tracker-uri sqlite:///$OUT/b1.db > $OUT/b1.log 2>&1 &
  JOB_TIMEOUT=130 timeout 280 bash benchmarks/multi_gpu.sh $OUT rest2b > $OUT/multi2.log 2>&1
  wait
  JOB_TIMEOUT=110 timeout 220 bash benchmarks/multi_gpu.sh $OUT rest4a > $OUT/multi4.log 2>&1
elif [ "$call" = 4 ]; then  # replicas × TP on torch's DTensor API (transformers' own cannot), on GPUs
  JOB_TIMEOUT=140 timeout 150 bash benchmarks/multi_gpu.sh $OUT rest4b > $OUT/multi4.log 2>&1
else  # after the GQA decode attention: old and new side by side, 4-bit rows, GPU tests, DP × TP
  CUDA_VISIBLE_DEVICES=0 timeout 250 $OPTIPIPE bench --model llama3_8b_random --batches 1,32 --repeats 2 --warmup 1 \
      --profile --baselines "" --configs "generate=fast generate.fast_gqa_attention=false" generate=fast \
      --out $OUT/bench --tracker-uri sqlite:///$OUT/bench.db > $OUT/bench.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout 250 $OPTIPIPE bench --model llama3_8b_random --batches 1 --repeats 2 --warmup 1 \
      --baselines "" --configs generate=fast "quantize=int4_torchao generate=fast" \
      "quantize=int4_torchao quantize.include_embeddings=true generate=fast" \
      --out $OUT/b1 --tracker-uri sqlite:///$OUT/b1.db > $OUT/b1.log 2>&1 &
  CUDA_VISIBLE_DEVICES=2,3 timeout 250 python3 -m pytest -q -p no:cacheprovider -m gpu tests/stages/test_engine.py \
      tests/pipeline/test_distributed.py > $OUT/tests.log 2>&1
  wait
  JOB_TIMEOUT=160 timeout 170 bash benchmarks/multi_gpu.sh $OUT rest4b > $OUT/multi4.log 2>&1
fi
for f in bench/bench.md b1/bench.md; do [ -f $OUT/$f ] && cat $OUT/$f; done
grep -hv "Loading weights" $OUT/multi*.log | grep -v "^$" | tail -30; tail -3 $OUT/tests.log 2>/dev/null
rm -rf $OUT/bench/work $OUT/b1/work $OUT/modes/work
# what comes back is at most 8 files: the job folders' profiles and everything else in one archive
for f in outputs/runs/*/*/generate_profile_*.md; do
  [ -f "$f" ] && mkdir -p $OUT/jobs && cp "$f" "$OUT/jobs/$(basename $(dirname $f))_$(basename $f)"
done
cd $OUT && tar czf /tmp/results.tgz . && find . -mindepth 1 -delete && mv /tmp/results.tgz .
