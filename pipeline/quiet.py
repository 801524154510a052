"""Third-party chatter stays off the console unless ``pipeline.verbose=true``.

What torchao, torch and transformers print on their own says nothing about the run: torchao's
"Failed to load …so" for kernels of other GPUs and "Detected no triton" on CPUs, torch's
deprecation notes about torchao's enums, transformers' "Loading weights" bars, and the profiler
library's start/stop lines (written by native code straight to the stderr file descriptor). Our own
output, errors and warnings at ERROR level from those packages still show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

# loggers whose warnings are about the package, not the run
CHATTY_LOGGERS = ("torchao", "torch.utils._pytree", "transformers", "accelerate", "huggingface_hub")
_state = {"verbose": True}


def apply(verbose: bool) -> None:
    """Quiet the chatty packages for the rest of this process (``verbose``: leave them as they are)."""
    _state["verbose"] = verbose
    if verbose:
        return
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers reads it at import …
    if "transformers" in sys.modules:  # … and this switch once imported
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@contextlib.contextmanager
def native_stderr() -> Iterator[None]:
    """Native code's writes to stderr (the profiler library's) go nowhere while quiet."""
    if _state["verbose"]:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
