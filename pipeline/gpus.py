"""What the visible GPUs are, read through nvidia-smi: the parent process that validates a job must
not initialise CUDA (its torchrun ranks would inherit a broken context), so rules ask here."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional


def _lines(fields: str) -> Optional[list[str]]:
    """nvidia-smi's CSV lines for ``fields``, one per GPU of the host; None when it cannot say."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()] or None  # a value may hold spaces


def visible_entries() -> Optional[list[str]]:
    """``CUDA_VISIBLE_DEVICES``'s entries as CUDA reads them (spaces around one do not count), or
    None when it is unset (every GPU of the host)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if visible is None else [e.strip() for e in visible.split(",")]


def query(field: str) -> Optional[list[str]]:
    """One nvidia-smi ``--query-gpu`` field, a value per GPU this process may use: all of the host's,
    or those ``CUDA_VISIBLE_DEVICES`` names (indices or ``GPU-`` UUIDs, in its order, up to its first
    entry that names no GPU, as CUDA reads it). None when unknown: MIG instances, or indices on a
    host of mixed GPUs without ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (CUDA then numbers the fastest first,
    nvidia-smi by bus)."""
    entries = visible_entries()
    if entries is None:
        return _lines(field)
    lines = _lines(f"index,uuid,name,{field}")
    rows = [line.split(", ", 3) for line in lines or []]
    if not rows or any(len(r) != 4 for r in rows):
        return None
    indices = any(e.isdigit() for e in entries)
    mixed = len({r[2] for r in rows}) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID"
    if any(e.startswith("MIG-") for e in entries) or (indices and mixed):
        return None
    chosen: list[list[str]] = []
    for entry in entries:
        row = next((r for r in rows if entry == r[0] or (entry.startswith("GPU-") and r[1].startswith(entry))), None)
        if row is None or row in chosen:
            break
        chosen.append(row)
    return [r[3] for r in chosen] or None


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
