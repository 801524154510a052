"""Where model weights come from: hub, local directory, GGUF file, the embedded default, or random.

Each source ends as something ``from_pretrained`` can read (a hub id or a local directory), so the
one materialization path (with quantization, attention and placement kwargs) serves all sources.
GGUF and random sources are converted once into a safetensors cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.contract import Problem, StageError
from stages.load.embedded import EMBEDDED, embedded_path
from stages.load.presets import PRESETS, preset_config
from stages.load.publish import publish

SOURCES = ("auto", "hub", "local", "gguf", "embedded", "random")
SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass
class Checkpoint:
    """What ``from_pretrained`` reads: a hub id or local directory plus source-specific kwargs."""

    path: str
    source: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def cache_root(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("OPTIPIPE_CACHE"):
        return Path(os.environ["OPTIPIPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "optipipe"


def resolve_source(spec) -> str:
    """The concrete source of ``spec`` (``source=auto`` is inferred from the id)."""
    if spec.source != "auto":
        return spec.source
    if spec.id in EMBEDDED:
        return "embedded"
    if spec.id.endswith(".gguf"):
        return "gguf"
    if os.path.isdir(os.path.expanduser(spec.id)) or spec.id.startswith(("/", "./", "../", "~")):
        return "local"
    return "hub"


# ---------------------------------------------------------------- cheap checks (validation)

def check(spec, allow_pickle: bool, trust_remote_code: bool) -> list[Problem]:
    """Problems with the model source found without reading weights."""
    source = resolve_source(spec)
    if source not in SOURCES:
        return [Problem("model.source", f"unknown source {source!r}",
                        f"model.source=<one of {', '.join(SOURCES)}>")]
    if source == "embedded":
        if spec.id not in EMBEDDED:
            return [Problem("model.id", f"no embedded model named {spec.id!r}",
                            f"model.id=<one of {', '.join(EMBEDDED)}>")]
        return []  # its wheel is fetched at load if neither installed nor cached
    if source == "random":
        if spec.id not in PRESETS:
            return [Problem("model.id", f"no architecture preset named {spec.id!r}",
                            f"model.id=<one of {', '.join(PRESETS)}>")]
        return []
    if source == "gguf":
        path = Path(spec.id).expanduser()
        if not path.is_file():
            return [Problem("model.id", f"GGUF file {str(path)!r} does not exist",
                            "model.id=<path to an existing .gguf file>")]
        return gguf_problems("model.id", path)
    if source == "local":
        return _check_local(Path(spec.id).expanduser(), spec, allow_pickle, trust_remote_code)
    if source == "hub":
        return _check_hub(spec, allow_pickle, trust_remote_code)
    return []


def gguf_problems(key: str, path: Path) -> list[Problem]:
    """A file named .gguf that does not start with GGUF's magic bytes would fail deep inside the
    conversion; say so before anything loads."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        return [Problem(key, f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                        f"{key}=<a .gguf file written by llama.cpp's convert or gguf-py>")]
    return []


def _check_local(path: Path, spec, allow_pickle: bool, trust_remote_code: bool) -> list[Problem]:
    if not path.is_dir():
        return [Problem("model.id", f"local model directory {str(path)!r} does not exist",
                        "model.id=<an existing directory, or a hub id such as org/name>")]
    if spec.gguf_file:
        if not (path / spec.gguf_file).is_file():
            return [Problem("model.gguf_file", f"{spec.gguf_file!r} is not a file in {str(path)!r}",
                            "model.gguf_file=<a .gguf file in that directory>")]
        return gguf_problems("model.gguf_file", path / spec.gguf_file)
    if not (path / "config.json").is_file():
        return [Problem("model.id", f"{str(path)!r} holds no config.json: not a transformers model "
                        "directory", "model.id=<a directory written by save_pretrained>")]
    problems = _check_remote_code(json.loads((path / "config.json").read_text()), trust_remote_code)
    safe = [f for pattern in SAFE_WEIGHTS for f in path.glob(pattern)]
    pickled = [f for pattern in PICKLE_WEIGHTS for f in path.glob(pattern)]
    if not safe and not pickled:
        problems.append(Problem("model.id", f"{str(path)!r} holds no weight files "
                                f"(looked for {', '.join(SAFE_WEIGHTS + PICKLE_WEIGHTS)})",
                                "model.id=<a directory with model.safetensors>"))
    elif not safe and not allow_pickle:
        problems.append(Problem("load.allow_pickle", f"{str(path)!r} holds only pickle weights "
                                f"({pickled[0].name}); unpickling can run arbitrary code, so it is off",
                                "load.allow_pickle=true (only if you trust the files), or re-save "
                                "the model with safetensors"))
    return problems


def _check_remote_code(config: dict, trust_remote_code: bool) -> list[Problem]:
    if config.get("auto_map") and not trust_remote_code:
        return [Problem("load.trust_remote_code", "this model needs code from its repository "
                        f"(auto_map: {sorted(config['auto_map'])}) and trust_remote_code is off",
                        "load.trust_remote_code=true (after reading that code)")]
    return []


def _check_hub(spec, allow_pickle: bool, trust_remote_code: bool) -> list[Problem]:
    """Fetch only config.json (a few KB) so a wrong id or missing access fails before any weight."""
    from huggingface_hub import hf_hub_download

    if spec.gguf_file:
        return []
    if os.path.isdir(os.path.expanduser(spec.id)):  # from_pretrained reads a local dir as well
        return _check_local(Path(spec.id).expanduser(), spec, allow_pickle, trust_remote_code)
    try:
        path = hf_hub_download(spec.id, "config.json", revision=spec.revision)
    except Exception as e:  # offline, no such repo, gated, …: all are the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [Problem("model.id", f"cannot read config.json of hub model {spec.id!r}: {first}",
                        "check the id, your network / HF_TOKEN, or point model.id at a local "
                        "directory")]
    return _check_remote_code(json.loads(Path(path).read_text()), trust_remote_code)


# ---------------------------------------------------------------- materialization (I/O)

def checkpoint(spec, cache: Path, random_dtype: str) -> Checkpoint:
    """Turn the source into a ``from_pretrained`` target, converting into the cache if needed."""
    source = resolve_source(spec)
    revision = {"revision": spec.revision} if spec.revision else {}
    if source == "hub":
        gguf = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        return Checkpoint(spec.id, source, {**revision, **gguf})
    if source == "local":
        if spec.gguf_file:
            return Checkpoint(str(_gguf_to_safetensors(Path(spec.id) / spec.gguf_file, cache)), source)
        return Checkpoint(str(Path(spec.id).expanduser()), source)
    if source == "gguf":
        return Checkpoint(str(_gguf_to_safetensors(Path(spec.id).expanduser(), cache)), source)
    if source == "embedded":
        path = embedded_path(spec.id, cache)
        if path.suffix == ".gguf":
            return Checkpoint(str(_gguf_to_safetensors(path, cache)), source)
        return Checkpoint(str(path), source)  # already a safetensors model directory
    if source == "random":
        return Checkpoint(str(_random_checkpoint(spec, cache, random_dtype)), source)
    raise StageError("load", f"unknown model source {source!r}")


def gguf_cache_dir(gguf: Path, cache: Path) -> Path:
    """Where a GGUF file's safetensors conversion lives: one per file, whichever source named it."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache / "gguf" / f"{gguf.stem}-{key}"


def _gguf_to_safetensors(gguf: Path, cache: Path) -> Path:
    """Dequantize a GGUF file once (~17 s for SmolLM2-135M) into a float32 safetensors dir."""
    dest = gguf_cache_dir(gguf, cache)

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"optipipe: converting {gguf.name} to safetensors once, into {dest}", flush=True)
        kw = dict(gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
        # The weights are dequantized now; drop the GGUF quantizer so they save as plain tensors.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(gguf.parent), **kw).save_pretrained(tmp)

    return publish(build, dest)


def _random_checkpoint(spec, cache: Path, dtype_name: str) -> Path:
    """Random weights at a preset's real shape, saved once so every load kwarg applies to them."""
    overrides = dict(spec.config_overrides)
    key_text = json.dumps([spec.id, overrides, spec.seed, dtype_name, spec.task], sort_keys=True)
    dest = cache / "random" / f"{spec.id}-{hashlib.sha256(key_text.encode()).hexdigest()[:12]}"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        from stages.load.tokenizer import byte_tokenizer

        config = preset_config(spec.id, overrides)
        print(f"optipipe: creating random {spec.id} weights ({dtype_name}) once, into {dest}",
              flush=True)
        torch.manual_seed(spec.seed)
        auto = AutoModelForCausalLM if spec.task == "causal_lm" else AutoModel
        # Initialize on the GPU when there is one: an 8B normal_() on CPU takes minutes.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = auto.from_config(config, dtype=getattr(torch, dtype_name))
        model.save_pretrained(tmp)
        byte_tokenizer(config.model_type, config.vocab_size).save_pretrained(tmp)
        del model

    return publish(build, dest)


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


# ---------------------------------------------------------------- architecture (cheap, for rules)

def architecture(spec) -> dict[str, Any] | None:
    """The model's config as a dict, read without weights, for rules that need shapes (head counts,
    hidden sizes). None when it cannot be had cheaply (e.g. a hub model not cached, offline)."""
    key = json.dumps([spec.id, spec.source, spec.revision, spec.gguf_file,
                      dict(spec.config_overrides)], sort_keys=True, default=str)
    if key not in _ARCHITECTURES:
        try:
            _ARCHITECTURES[key] = _read_architecture(spec)
        except Exception:  # a rule that cannot see the shapes is skipped, never a crash
            _ARCHITECTURES[key] = None
    return _ARCHITECTURES[key]


_ARCHITECTURES: dict[str, dict[str, Any] | None] = {}


def _read_architecture(spec) -> dict[str, Any] | None:
    source = resolve_source(spec)
    if source == "random":
        return preset_config(spec.id, dict(spec.config_overrides)).to_dict()
    gguf = None
    if source == "gguf":
        gguf = Path(spec.id).expanduser()
    elif source == "local" and spec.gguf_file:
        gguf = Path(spec.id).expanduser() / spec.gguf_file
    elif source == "embedded":
        path = embedded_path(spec.id, cache_root(None), fetch=False)  # validation downloads nothing
        if path is None:
            return None
        gguf = path if path.suffix == ".gguf" else None
        if gguf is None:
            return json.loads((path / "config.json").read_text())
    if gguf is not None:
        converted = gguf_cache_dir(gguf, cache_root(None)) / "config.json"
        if converted.is_file():  # converted before: its config is a small JSON file
            return json.loads(converted.read_text())
        # header only (GGUF keeps the config as metadata before the tensors), but parsing it takes
        # seconds: only until the first run converts the file
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        return load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    if source == "local":
        return json.loads((Path(spec.id).expanduser() / "config.json").read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(spec.id, revision=spec.revision).to_dict()
