"""The settings of every built-in stage, as dataclasses: the single source of their defaults.

Torch-free on purpose: ``conf/__init__.py`` imports this module whenever a configuration is composed
(``optipipe --help`` included) and registers each dataclass's defaults with Hydra, so a YAML file in
``conf/`` holds only its ``_target_`` and what differs. Each stage class names its dataclass as
``Config``; validation checks a node against it key by key (``pipeline.config.typed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class LoadConfig:
    dtype: str = "auto"  # auto (the checkpoint's own) | bfloat16 | float16 | float32
    device: str = "auto"  # auto (CUDA if present, else CPU) | cpu | cuda | cuda:N
    trust_remote_code: bool = False  # never on by default: it runs the repository's Python
    allow_pickle: bool = False  # safetensors only unless you opt in to pickle checkpoints
    cache_dir: Optional[str] = None  # GGUF/random conversions; default $OPTIPIPE_CACHE or ~/.cache/optipipe
    num_threads: Optional[int] = None  # CPU threads for torch's kernels; null: torch's default (the cores)


@dataclass
class BitsAndBytesSettings:
    bits: int = 4  # 4 (nf4 / fp4) | 8 (LLM.int8)
    quant_type: str = "nf4"  # 4-bit only: nf4 | fp4
    compute_dtype: str = "bfloat16"  # 4-bit matmul dtype; transformers' silent default is float32
    double_quant: bool = False  # 4-bit: quantize the quantization constants too (~0.4 bit/param)
    quant_storage: str = "uint8"  # 4-bit: dtype that packs the weights (bfloat16 for FSDP-style sharding)
    threshold: float = 6.0  # 8-bit: outlier threshold of LLM.int8
    skip_modules: Optional[list[str]] = None  # modules left unquantized (default: the output head)
    cpu_offload: bool = False  # 8-bit: allow fp32 modules on CPU (llm_int8_enable_fp32_cpu_offload)
    extra: dict[str, Any] = field(default_factory=dict)  # any other BitsAndBytesConfig argument


@dataclass
class TorchAoSettings:
    # int4 (group-wise, asymmetric) | int8 (per output row) | fp8 (e4m3, per output row)
    weights: str = "int4"
    # none: weight-only (dequantized inside the matmul) | dynamic: activations quantized per row as they
    # come, float8 matmuls (fp8 only)
    activations: str = "none"
    group_size: Optional[int] = None  # int4: weights sharing one scale; None: the largest of 128/64/32 that fits
    include_embeddings: bool = False  # quantize the input embedding and output head too


@dataclass
class Float8RowsSettings:
    # quantize the output head too (an untied one: a head tied to the input embedding stays dense,
    # since a float8 copy would add bytes, not save them)
    include_head: bool = True


@dataclass
class AttentionConfig:
    implementation: str = "sdpa"  # eager | sdpa | flash_attention_2 | flex_attention | optipipe_gqa_decode | my_pkg.KIND
    sdpa_backends: list[str] = field(default_factory=list)  # pin: flash, efficient, math, cudnn ([]: PyTorch picks)
    static_cache: bool = False  # preallocated KV cache: fixed shapes, the precondition for compile
    compile: bool = False  # torch.compile the decode step (needs static_cache)
    compile_mode: str = "reduce-overhead"  # reduce-overhead captures CUDA graphs
    fullgraph: bool = True  # compile: one graph or an error (no silent graph breaks)
    dynamic: bool = False  # compile: fixed shapes (the static cache has them)


@dataclass
class PipelinePlacementConfig:
    # accelerate: sequential fills device 0 first (a model that fits stays whole: no cross-device hops);
    # auto/balanced spread evenly even when one device would do (transformers' "device_map=auto")
    device_map: str = "sequential"
    max_memory: Optional[dict[Any, str]] = None  # {0: "20GiB", "cpu": "64GiB"}: GPU index or cpu; None: all there is
    offload_folder: Optional[str] = None  # disk offload for layers that fit on no device


@dataclass
class TpLayerSettings:
    """How tensor-parallel layers run (shard=tensor_parallel; shard=data_parallel with tp_size > 1)."""

    runtime: str = "optipipe"  # optipipe: local layers + our all-reduce | transformers: DTensor layers
    all_reduce: str = "auto"  # auto: one-shot symmetric memory where GPUs share memory | symm_mem | process_group
    vocab_parallel_head: bool = True  # each rank holds 1/N of the output head; logits assembled by one all-reduce
    split_greedy: bool = True  # generate=fast greedy: each rank's best token, then a tiny all-reduce (no logits gathered)
    one_shot_max_kib: int = 1024  # larger messages (prefill) take the process group's all-reduce
    agreed_tuning: bool = True  # ranks tune the decode step's kernels together and pick the same configurations
    fuse_norm: bool = True  # generate=fast: all-reduce + residual add + RMSNorm as one kernel in the decode step
    # how that kernel waits for the other ranks' rows: together (all peers in one load a poll, residual
    # and weight read first; TP4 batch 1 about 2 % faster on 4 x H200) | in_turn (one peer after another)
    fuse_norm_wait: str = "together"


@dataclass
class TensorParallelConfig(TpLayerSettings):
    tp_size: Optional[int] = None  # None: every process of the job; must equal it (replicas: data_parallel)


@dataclass
class DataParallelConfig(TpLayerSettings):
    tp_size: int = 1  # >1: each replica is tensor parallel over tp_size processes (4 GPUs = 2 × TP2)
    # replicas × TP, runtime (inherited default optipipe): our local layers over each replica's ranks
    # (2.90× one GPU at batch 32 for 2 × TP2 on 4 × H200) | transformers: torch's DTensor layers with the
    # model's TP plan, reducing through NCCL eagerly (1.98×)


@dataclass
class GenerateConfig:
    prompts: Optional[list[str]] = None  # None: our built-in prompts
    prompt_file: Optional[str] = None  # .txt (one per line) or .jsonl ("prompt" field)
    chat_template: str = "auto"  # auto (when the tokenizer has one) | on | off
    prompt_tokens: Optional[int] = None  # benchmark: every prompt exactly N tokens, no template
    batch_size: int = 1  # prompts per generate call (the prompts cycle to fill it)
    max_new_tokens: int = 32
    benchmark: bool = False  # force exactly max_new_tokens (EOS does not stop the run)
    do_sample: bool = False  # false: greedy
    temperature: float = 1.0  # sampling only, as top_p and top_k
    top_p: float = 1.0
    top_k: int = 50
    seed: int = 0  # every repeat samples the same way
    warmup: int = 1  # untimed runs first: allocator, kernels, compilation
    repeats: int = 3  # timed runs; percentiles come from these
    engine: str = "transformers"  # transformers: model.generate | fast: static cache + compiled step | a class path
    engine_options: dict[str, Any] = field(default_factory=dict)  # a plugin engine's settings (its Config)
    fast_compile_mode: Optional[str] = "reduce-overhead"  # fast engine's torch.compile mode; null: eager
    stop_check_every: int = 16  # fast engine: tokens between its "every row finished?" checks
    fast_compile_prefill: bool = False  # fast engine: compile the prompt's forward too (TTFT)
    # fast engine, with fast_compile_prefill: the prompt's forward as a CUDA graph too, prompts
    # left-padded to a multiple of fast_prefill_bucket tokens (one compile and graph per padded length)
    fast_prefill_graph: bool = False
    fast_prefill_bucket: int = 64
    fast_gqa_attention: bool = True  # fast engine: decode attention reads each key/value head once
    # fast engine, grouped-query decode steps: sdpa (PyTorch's kernel on the packed heads) | split_kv
    # (ours: the cache's length split over thread blocks, then combined; CUDA and Triton) | auto:
    # split_kv with tensor parallel where it can run, sdpa otherwise (stages/generate/auto_levers.py)
    fast_decode_attention: str = "auto"
    fast_coordinate_descent: bool = True  # fast engine: inductor tunes the step's kernels (M=1 matmuls as reductions)
    # fast engine: q/k/v and gate/up each one matmul in compiled steps (weights joined, no copy);
    # null: whenever the step compiles and the weights are plain tensors (not quantized)
    fast_fuse_projections: Optional[bool] = None
    # fast engine: inductor's realize_opcount_threshold in the decode step. A pointwise expression of
    # more ops than this is computed once into a buffer instead of inside each consumer; a one-row
    # matmul, as a reduction, would recompute it for every output row. null: inductor's own (30)
    fast_realize_opcount: Optional[int] = 4
    # fast engine, Hopper and newer GPUs: the compiled step's kernels launch before the previous one
    # ends and wait for its results inside (inductor's programmatic dependent launch); null: on with
    # tensor parallel where it can run, off on one process (not measured there; auto_levers.py)
    fast_pdl: Optional[bool] = None
    profile: bool = False  # one more run under the PyTorch profiler: generate_profile_b<batch>.md


@dataclass
class EncodeConfig:
    texts: Optional[list[str]] = None  # None: built-in texts of 1 to 8 sentences
    text_file: Optional[str] = None  # .txt (one per line) or .jsonl ("prompt" field)
    batch_size: int = 32
    max_length: int = 128  # longer texts are truncated
    batches: int = 4  # batches per timed run
    warmup: int = 1
    repeats: int = 5
    pooling: str = "mean"  # mean | cls


@dataclass
class CorpusSettings:
    file: Optional[str] = None  # a text file, or .jsonl with `field`
    dataset: Optional[str] = None  # a Hugging Face datasets name (needs network and `datasets`)
    dataset_config: Optional[str] = None
    split: str = "test"
    field: Optional[str] = None  # JSONL / dataset text field (default "text")
    max_chars: int = 8000  # offline default (Python stdlib docstrings, assembled at run time): ~2,000 SmolLM2 tokens


@dataclass
class GateSettings:
    # each bound is checked against the reference's comparison; None: not checked
    max_perplexity_increase_pct: Optional[float] = None  # e.g. 5.0
    min_token_agreement: Optional[float] = None  # mean share of each greedy continuation before it parts from the reference's, 0–1
    min_top1_agreement: Optional[float] = None  # corpus positions with the reference's top token, 0–1
    max_kl: Optional[float] = None  # mean KL(reference ‖ ours) over corpus positions
    min_cosine: Optional[float] = None  # encoders: the lowest embedding cosine similarity
    enforce: bool = False  # true: a failed gate fails the run (exit code 1)


@dataclass
class EvaluateConfig:
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    max_length: int = 256  # window length (tokens)
    stride: int = 128  # a new window every `stride` tokens; stride = max_length: no overlap
    windowing: str = "strided"  # strided (transformers guide) | rolling (lm-eval's loglikelihood_rolling)
    batch_size: int = 4  # windows per forward
    reference: bool = True  # compare with the same weights, no quantize/convert, eager attention
    reference_dtype: Optional[str] = None  # None: the load dtype
    compare_tokens: int = 256  # corpus positions compared token by token (top-1, KL)
    new_tokens: int = 32  # greedy continuation length for token agreement
    cache: bool = True  # reference results cached per model, dtype, corpus and settings
    gate: GateSettings = field(default_factory=GateSettings)


# registered with Hydra by conf/__init__.py (nested ones travel inside their parent)
ALL: list[type] = [LoadConfig, BitsAndBytesSettings, TorchAoSettings, Float8RowsSettings, AttentionConfig,
                   PipelinePlacementConfig, TensorParallelConfig, DataParallelConfig, GenerateConfig, EncodeConfig, EvaluateConfig]
