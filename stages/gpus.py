"""What the visible GPUs are, read through nvidia-smi: the parent process that validates a job must
not initialise CUDA (its torchrun ranks would inherit a broken context), so rules ask here."""

from __future__ import annotations

import shutil
import subprocess
from typing import Optional


def query(field: str) -> Optional[list[str]]:
    """One nvidia-smi ``--query-gpu`` field, a value per visible GPU; None when unknown."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()] or None  # a value may hold spaces


def memory_bytes() -> Optional[int]:
    """Smallest total memory of the visible GPUs; None when unknown."""
    try:
        values = query("memory.total")
        return min(int(float(x)) for x in values) * 2**20 if values else None
    except ValueError:
        return None


def compute_capabilities() -> Optional[list[float]]:
    """Compute capability of each visible GPU (9.0 for H100/H200); None when unknown."""
    try:
        values = query("compute_cap")
        return [float(x) for x in values] if values else None
    except ValueError:
        return None
