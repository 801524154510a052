#!/usr/bin/env bash
# Multi-GPU measurements of issue #5: every row is an ordinary `optipipe` job (its own torchrun
# group where launched so), logged to one MLflow store; multi_gpu_table.py turns it into a table.
#   benchmarks/multi_gpu.sh STORE_DIR PHASE      PHASE: 2gpu (GPUs 2,3) | 4gpu (GPUs 0-3)
# The plain-transformers equivalents are measured by the same generate stage:
#   shard=pipeline (accelerate device_map="auto", transformers generate)         = device_map="auto"
#   shard=tensor_parallel convert=compile (tp_plan="auto", static cache + compile) = tp_plan="auto"
set -u
store=${1:?store dir}; phase=${2:?phase}
common=(model=llama3_8b_random load.dtype=bfloat16 generate.benchmark=true generate.prompt_tokens=128
        generate.max_new_tokens=256 generate.warmup=1 generate.repeats=3 ++launcher.collective_timeout_s=600
        "tracker.uri=sqlite:///$store/multi.db" tracker.experiment=multi-gpu)
job() {  # one job; a failure is recorded in the store and the next job runs
  echo "=== $*"; timeout 240 ${OPTIPIPE:-optipipe} "${common[@]}" "$@" 2>&1 | grep -v "Loading weights" | tail -4
}
if [ "$phase" = 2gpu ]; then
  tp=(launcher=torchrun launcher.nproc_per_node=2 "launcher.devices=[2,3]")
  job shard=tensor_parallel "${tp[@]}" generate=fast generate.batch_size=1 tracker.run_name=tp2_fast_b1
  job shard=data_parallel "${tp[@]}" generate=fast generate.batch_size=32 tracker.run_name=dp2_fast_b32
  CUDA_VISIBLE_DEVICES=2,3 job shard=pipeline generate.batch_size=1 tracker.run_name=pipeline2_b1
  job shard=tensor_parallel "${tp[@]}" convert=sdpa generate.batch_size=1 tracker.run_name=tp2_eager_b1
  job shard=tensor_parallel "${tp[@]}" generate=fast generate.batch_size=32 tracker.run_name=tp2_fast_b32
  job shard=tensor_parallel "${tp[@]}" convert=compile generate.batch_size=1 tracker.run_name=tp2_hf_compile_b1
else
  tp=(launcher=torchrun launcher.nproc_per_node=4)
  job shard=tensor_parallel "${tp[@]}" generate=fast generate.batch_size=1 tracker.run_name=tp4_fast_b1
  job shard=data_parallel "${tp[@]}" generate=fast generate.batch_size=32 tracker.run_name=dp4_fast_b32
  job shard=tensor_parallel "${tp[@]}" generate=fast generate.batch_size=32 tracker.run_name=tp4_fast_b32
fi
if [ "$phase" = 4gpu_short ]; then  # what fitted the last minutes of the session's device time
  CUDA_VISIBLE_DEVICES=2,3 job shard=pipeline generate.batch_size=1 tracker.run_name=pipeline2_b1
  job shard=tensor_parallel launcher=torchrun launcher.nproc_per_node=4 convert=sdpa generate.batch_size=1 tracker.run_name=tp4_eager_b1
  job shard=data_parallel launcher=torchrun launcher.nproc_per_node=4 generate=fast generate.batch_size=32 tracker.run_name=dp4_fast_b32
fi
