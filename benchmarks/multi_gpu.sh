#!/usr/bin/env bash
# Multi-GPU measurements of issue #5: every row is an ordinary `optipipe` job (its own torchrun
# group where launched so), logged to one MLflow store; multi_gpu_table.py turns it into a table.
#   benchmarks/multi_gpu.sh STORE_DIR PHASE      PHASE: 2gpu | rest2 | rest2b (GPUs 2,3) | 4gpu | rest4a | rest4b (GPUs 0-3)
# The plain-transformers equivalents are measured by the same generate stage:
#   shard=pipeline shard.device_map=auto (accelerate, transformers generate)      = device_map="auto"
#   shard=tensor_parallel convert=compile (tp_plan="auto", static cache + compile) = tp_plan="auto"
set -u
store=${1:?store dir}; phase=${2:?phase}
common=(model=llama3_8b_random load.dtype=bfloat16 generate.benchmark=true generate.prompt_tokens=128
        generate.max_new_tokens=256 generate.warmup=1 generate.repeats=3 ++launcher.collective_timeout_s=600
        "tracker.uri=sqlite:///$store/multi.db" tracker.experiment=multi-gpu)
job() {  # one job; a failure is recorded in the store and the next job runs
  echo "=== $*"; timeout ${JOB_TIMEOUT:-240} ${OPTIPIPE:-optipipe} "${common[@]}" "$@" 2>&1 | grep -v "Loading weights" | tail -4
}
two=(launcher=torchrun launcher.nproc_per_node=2 "launcher.devices=[2,3]")
four=(launcher=torchrun launcher.nproc_per_node=4)
case "$phase" in
  2gpu)  # run 2026-11-26 (the last job ran out of time)
    job shard=tensor_parallel "${two[@]}" generate=fast generate.batch_size=1 tracker.run_name=tp2_fast_b1
    job shard=data_parallel "${two[@]}" generate=fast generate.batch_size=32 tracker.run_name=dp2_fast_b32
    CUDA_VISIBLE_DEVICES=2,3 job shard=pipeline generate.batch_size=1 tracker.run_name=pipeline2_b1
    job shard=tensor_parallel "${two[@]}" convert=sdpa generate.batch_size=1 tracker.run_name=tp2_eager_b1
    job shard=tensor_parallel "${two[@]}" generate=fast generate.batch_size=32 tracker.run_name=tp2_fast_b32
    job shard=tensor_parallel "${two[@]}" convert=compile generate.batch_size=1 tracker.run_name=tp2_hf_compile_b1 ;;
  4gpu)  # run 2026-11-26: tp4_fast_b1 only
    job shard=tensor_parallel "${four[@]}" generate=fast generate.batch_size=1 tracker.run_name=tp4_fast_b1
    job shard=data_parallel "${four[@]}" generate=fast generate.batch_size=32 tracker.run_name=dp4_fast_b32
    job shard=tensor_parallel "${four[@]}" generate=fast generate.batch_size=32 tracker.run_name=tp4_fast_b32 ;;
  rest2)  # gpu_profile_session.sh call 1, GPUs 2,3 (the last job was cut by the call's limit after logging)
    CUDA_VISIBLE_DEVICES=2,3 job shard=pipeline generate.batch_size=1 tracker.run_name=pipeline2_b1
    CUDA_VISIBLE_DEVICES=2,3 job shard=pipeline shard.device_map=auto generate.batch_size=1 tracker.run_name=device_map_auto2_b1
    job shard=tensor_parallel "${two[@]}" generate=fast generate.batch_size=1 generate.profile=true tracker.run_name=tp2_fast_b1_profile
    job shard=tensor_parallel "${two[@]}" convert=compile generate.batch_size=1 tracker.run_name=tp2_hf_compile_b1 ;;
  rest2b)  # gpu_profile_session.sh call 2, GPUs 2,3: placement with the fast engine, and the device_map="auto" batch-32 baseline
    CUDA_VISIBLE_DEVICES=2,3 job shard=pipeline generate=fast generate.batch_size=1 tracker.run_name=pipeline2_fast_b1
    CUDA_VISIBLE_DEVICES=2,3 job shard=pipeline shard.device_map=balanced generate=fast generate.batch_size=1 tracker.run_name=balanced2_fast_b1
    CUDA_VISIBLE_DEVICES=2,3 job shard=pipeline shard.device_map=auto generate.batch_size=32 tracker.run_name=device_map_auto2_b32 ;;
  rest4a)  # gpu_profile_session.sh call 2, after rest2b: GPUs 0-3
    job shard=data_parallel "${four[@]}" generate=fast generate.batch_size=32 tracker.run_name=dp4_fast_b32
    job shard=tensor_parallel "${four[@]}" generate=fast generate.batch_size=32 tracker.run_name=tp4_fast_b32 ;;
  rest4b)  # gpu_profile_session.sh calls 3 (failed: transformers' TP API) and 4: GPUs 0-3
    job shard=data_parallel shard.tp_size=2 "${four[@]}" generate=fast generate.batch_size=32 tracker.run_name=dp2xtp2_fast_b32 ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
