"""What the run ran on: versions, devices, driver, commit. Logged as environment.json."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.gpus import query as nvidia_smi_query

PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "hydra-core", "omegaconf",
            "mlflow-skinny", "mlflow", "safetensors", "gguf", "torchao", "numpy", "optipipe")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the optipipe source tree, when it runs from a git checkout; ``+modified`` after it
    when tracked files differ from that commit (the run's code is then not the commit's)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                 capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip() if out.returncode == 0 else ""
    if not commit:
        return None
    return commit + ("+modified" if changed.returncode == 0 and changed.stdout.strip() else "")


def nvidia_driver() -> str | None:
    values = nvidia_smi_query("driver_version")
    return values[0] if values else None


def gpu_count() -> int:
    """Visible GPUs without initialising CUDA in this process (nvidia-smi)."""
    return len(nvidia_smi_query("name") or [])


def describe() -> dict[str, Any]:
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 2),
                         "capability": f"{p.major}.{p.minor}"})
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus,
        "nvidia_driver": nvidia_driver() if gpus else None,
        "git_commit": git_commit(),
    }


def fingerprint() -> dict[str, Any]:
    """What a measurement depends on besides its config: package versions, the source commit and the
    cards (not the host's name or load). Two runs with equal configs and fingerprints measured the
    same thing; a resumed sweep reuses a run only then."""
    env = describe()
    return {"python": env["python"], "packages": env["packages"], "cuda": env["cuda"],
            "gpus": [(g["name"], g["capability"]) for g in env["gpus"]], "git_commit": env["git_commit"]}

