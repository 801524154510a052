"""shard stage: where the weights live and how many processes share the work.

``single`` one device · ``pipeline`` accelerate placement over GPUs, CPU and disk ·
``tensor_parallel`` transformers' TP plan over every process · ``data_parallel`` one replica per
process (or per ``tp_size`` processes), prompts split between replicas.
"""

from stages.shard.parallel import DataParallel, TensorParallel
from stages.shard.placement import PipelinePlacement, Single

__all__ = ["DataParallel", "PipelinePlacement", "Single", "TensorParallel"]
